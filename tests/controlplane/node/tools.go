//go:build tools

// Package tools pins the Go programs of the test cluster's real node: kubelet and kube-proxy from
// the same k8s.io/kubernetes release as the control plane (../go.mod), and CoreDNS.
//
// A module of its own, so that adding these did not change ../go.sum (the control plane's cache
// key) and so that the node builds in parallel with the control plane. Nothing here is compiled
// into moeserve; build.sh builds the main packages.
package tools

import (
	_ "github.com/coredns/coredns"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
