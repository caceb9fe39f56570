//go:build tools

// The real etcd server for the tests' API server: `go build go.etcd.io/etcd/server/v3` from this module
// (cargo xtask setup does it). go.mod pins the release.
package tools

import _ "go.etcd.io/etcd/server/v3"
