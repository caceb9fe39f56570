// cnidriver drives a CNI network configuration list through the real libcni
// (github.com/containernetworking/cni/libcni, the library containerd and
// CRI-O use), the way a container runtime does for a Kubernetes pod sandbox.
//
// Build (GOPATH mode against Debian's golang-github-appc-cni-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode /usr/lib/go-1.19/bin/go build -o OUT tests/cnidriver/main.go
//
// Usage:
//
//	cnidriver (add|check|del) --conflist FILE --bin-dir DIR --cache-dir DIR \
//	    --netns PATH --container-id ID --ifname eth0 \
//	    --pod-namespace NS --pod-name NAME --pod-uid UID \
//	    [--capability-args JSON] [--timeout DURATION]
//
// On success `add` prints the result JSON on stdout. Every command prints
// `elapsed_us=N` (time spent inside the libcni call only) on stderr, after a
// line `plugin_us=TYPE:N` per plugin libcni ran (from its exec until libcni
// had its output), in the order it ran them. On error
// the error is printed on stderr and the exit status is 1 (2 for usage
// errors); when the failure carries a plugin's CNI error, a line
// `cni_error={"code":N,"msg":"...","details":"..."}` precedes it.
// Plugins' own stderr output is passed through to stderr (libcni's default).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// timedExec is libcni's own plugin executor, timing each plugin run.
type timedExec struct {
	*invoke.DefaultExec
	runs []string
}

func (t *timedExec) ExecPlugin(ctx context.Context, pluginPath string, stdinData []byte, environ []string) ([]byte, error) {
	start := time.Now()
	out, err := t.DefaultExec.ExecPlugin(ctx, pluginPath, stdinData, environ)
	t.runs = append(t.runs, fmt.Sprintf("plugin_us=%s:%d", filepath.Base(pluginPath), time.Since(start).Microseconds()))
	return out, err
}

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "cnidriver: "+format+"\n", args...)
	os.Exit(code)
}

func main() {
	if len(os.Args) < 2 {
		fail(2, "usage: cnidriver (add|check|del) --conflist FILE --bin-dir DIR --cache-dir DIR --netns PATH --container-id ID --ifname IF --pod-namespace NS --pod-name NAME --pod-uid UID [--capability-args JSON] [--timeout DURATION]")
	}
	cmd := os.Args[1]
	switch cmd {
	case "add", "check", "del":
	default:
		fail(2, "unknown command %q: want add, check or del", cmd)
	}

	fs := flag.NewFlagSet("cnidriver "+cmd, flag.ContinueOnError)
	conflist := fs.String("conflist", "", "CNI network configuration list file")
	binDir := fs.String("bin-dir", "", "CNI plugin directories (colon separated)")
	cacheDir := fs.String("cache-dir", "", "libcni cache directory")
	netns := fs.String("netns", "", "network namespace path")
	containerID := fs.String("container-id", "", "sandbox container id")
	ifName := fs.String("ifname", "eth0", "interface name inside the netns")
	podNamespace := fs.String("pod-namespace", "", "K8S_POD_NAMESPACE")
	podName := fs.String("pod-name", "", "K8S_POD_NAME")
	podUID := fs.String("pod-uid", "", "K8S_POD_UID")
	capArgs := fs.String("capability-args", "", `runtime capability args as JSON (default {"portMappings":[]}, as containerd passes)`)
	timeout := fs.Duration("timeout", 2*time.Minute, "deadline for the libcni call")
	if err := fs.Parse(os.Args[2:]); err != nil {
		os.Exit(2)
	}
	if fs.NArg() != 0 {
		fail(2, "unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	for name, v := range map[string]string{
		"--conflist": *conflist, "--bin-dir": *binDir, "--cache-dir": *cacheDir,
		"--netns": *netns, "--container-id": *containerID, "--ifname": *ifName,
	} {
		if v == "" {
			fail(2, "%s is required", name)
		}
	}

	list, err := libcni.ConfListFromFile(*conflist)
	if err != nil {
		fail(1, "loading %s: %v", *conflist, err)
	}

	capabilityArgs := map[string]interface{}{"portMappings": []interface{}{}}
	if *capArgs != "" {
		capabilityArgs = map[string]interface{}{}
		if err := json.Unmarshal([]byte(*capArgs), &capabilityArgs); err != nil {
			fail(2, "--capability-args is not a JSON object: %v", err)
		}
	}

	// The same Args kubelet's dockershim / containerd's CRI plugin pass.
	rt := &libcni.RuntimeConf{
		ContainerID: *containerID,
		NetNS:       *netns,
		IfName:      *ifName,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", *podNamespace},
			{"K8S_POD_NAME", *podName},
			{"K8S_POD_INFRA_CONTAINER_ID", *containerID},
			{"K8S_POD_UID", *podUID},
		},
		CapabilityArgs: capabilityArgs,
	}

	exec := &timedExec{DefaultExec: &invoke.DefaultExec{
		RawExec:       &invoke.RawExec{Stderr: os.Stderr},
		PluginDecoder: version.PluginDecoder{},
	}}
	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(*binDir, ":"), *cacheDir, exec)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	var resultJSON []byte
	start := time.Now()
	switch cmd {
	case "add":
		res, e := cni.AddNetworkList(ctx, list, rt)
		err = e
		if e == nil {
			if res == nil {
				err = fmt.Errorf("AddNetworkList returned no result")
			} else {
				resultJSON, err = json.Marshal(res)
			}
		}
	case "check":
		err = cni.CheckNetworkList(ctx, list, rt)
	case "del":
		err = cni.DelNetworkList(ctx, list, rt)
	}
	elapsed := time.Since(start)
	for _, run := range exec.runs {
		fmt.Fprintln(os.Stderr, run)
	}
	fmt.Fprintf(os.Stderr, "elapsed_us=%d\n", elapsed.Microseconds())

	if err != nil {
		// libcni wraps the plugin's error JSON ({"code","msg","details"}) in
		// its own message; expose the structured form on its own line so
		// tests can assert on the code and message the plugin returned.
		var cniErr *types.Error
		if errors.As(err, &cniErr) {
			if b, jerr := json.Marshal(cniErr); jerr == nil {
				fmt.Fprintf(os.Stderr, "cni_error=%s\n", b)
			}
		}
		fail(1, "%s failed: %v", cmd, err)
	}
	if resultJSON != nil {
		os.Stdout.Write(resultJSON)
		os.Stdout.Write([]byte("\n"))
	}
}
