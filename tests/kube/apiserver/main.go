// The real kube-apiserver, built from the k8s.io/kubernetes module for the tests (cargo xtask setup builds it).
// Its staging modules are pinned in go.mod to the release's published versions, as projects embedding the API
// server do; nothing of Kubernetes is copied here.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
