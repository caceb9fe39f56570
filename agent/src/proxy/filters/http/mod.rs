pub mod local_reply;
pub mod router;
