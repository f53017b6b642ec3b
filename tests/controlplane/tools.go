//go:build tools

// Package tools pins the Go programs that make up the test control plane.
//
// Nothing here is compiled into moeserve. The blank imports keep every main package in this
// module's graph, so go.sum covers all of them and tests/controlplane/build.sh can build them
// with one pinned set of versions.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "helm.sh/helm/v3/cmd/helm"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
