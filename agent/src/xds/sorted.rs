//! A pod's resources of one type: shared entries in a vector sorted by name. One pointer per resource, where
//! a map would add a key and node overhead to every entry of every pod.

use super::{Entry, Resource};

#[derive(Debug)]
pub struct ByName<T>(Vec<Entry<T>>);

/// Copies the pointers (copy on write of a pod's store), never the resources.
impl<T> Clone for ByName<T> {
    fn clone(&self) -> Self {
        ByName(self.0.clone())
    }
}

impl<T> Default for ByName<T> {
    fn default() -> Self {
        ByName(Vec::new())
    }
}

impl<T> ByName<T> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|e| (*e.name).cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&Entry<T>> {
        self.find(name).ok().map(|i| &self.0[i])
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Inserts or replaces the entry of the same name.
    pub fn insert(&mut self, entry: Entry<T>) {
        match self.find(&entry.name) {
            Ok(i) => self.0[i] = entry,
            Err(i) => self.0.insert(i, entry),
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Entry<T>> {
        self.find(name).ok().map(|i| self.0.remove(i))
    }

    pub fn retain(&mut self, keep: impl FnMut(&Entry<T>) -> bool) {
        self.0.retain(keep);
        self.0.shrink_to_fit();
    }

    pub fn values(&self) -> std::slice::Iter<'_, Entry<T>> {
        self.0.iter()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Resource<T>)> {
        self.0.iter().map(|e| (&*e.name, &**e))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
