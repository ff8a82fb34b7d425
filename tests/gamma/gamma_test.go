// The upstream Gateway API conformance suite, run as its implementations run it
// (conformance.RunConformanceWithOptions), against the mesh on the tests' real control plane.
// tests/tests/kube_conformance.rs builds the cluster, writes the conformance options file
// (profiles MESH-HTTP and MESH-GRPC, the supported features, the namespace labels that put the
// suite's namespaces in the mesh) and runs this binary with KUBECONFIG set.
//
// One thing stands in front of the API server: the mesh scenarios run their client inside the
// echo pods with `pods/exec`, which the API server hands to the node's kubelet, and the testbed
// kubelet has no streaming server. So the suite talks to a local front that passes every request
// to the API server unchanged, except `pods/exec`, which it serves itself with the kubelet's own
// streaming code (k8s.io/cri-streaming): after checking the pod and container with the API
// server, it runs the command in the container as the testbed kubelet's exec probes do, from
// the description the kubelet publishes for each running container (-exec-state).
package gamma

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	clientset "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/gateway-api/conformance"
)

var execState = flag.String("exec-state", "",
	"comma-separated directories in which the testbed kubelets describe their running containers")

// TestMeshConformance runs the suite; its options come from -conformance-options-file.
func TestMeshConformance(t *testing.T) {
	if *execState == "" {
		t.Fatal("-exec-state is required: the directories of the testbed kubelets' container descriptions")
	}
	opts := conformance.DefaultOptions(t)
	upstream, err := clientset.NewForConfig(opts.RestConfig)
	if err != nil {
		t.Fatalf("a clientset for the API server: %v", err)
	}
	front := serveFront(t, opts.RestConfig, &executor{
		dirs: strings.Split(*execState, ","),
		api:  upstream,
	})
	opts.RestConfig = front
	if opts.Client, err = client.New(front, opts.ClientOptions); err != nil {
		t.Fatalf("a client through the front: %v", err)
	}
	if opts.Clientset, err = clientset.NewForConfig(front); err != nil {
		t.Fatalf("a clientset through the front: %v", err)
	}
	conformance.RunConformanceWithOptions(t, opts)
}

// The path of a pod's exec subresource.
var execPath = regexp.MustCompile(`^/api/v1/namespaces/([^/]+)/pods/([^/]+)/exec$`)

// serveFront starts the front on the loopback and returns a configuration that reaches the API
// server through it.
func serveFront(t *testing.T, upstream *rest.Config, ex *executor) *rest.Config {
	transport, err := rest.TransportFor(upstream)
	if err != nil {
		t.Fatalf("the API server's transport: %v", err)
	}
	target, err := url.Parse(upstream.Host)
	if err != nil {
		t.Fatalf("the API server's address %q: %v", upstream.Host, err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = transport
	// Watches stream: pass every chunk on as it comes.
	proxy.FlushInterval = -1
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if m := execPath.FindStringSubmatch(r.URL.Path); m != nil {
			ex.serve(w, r, m[1], m[2])
			return
		}
		proxy.ServeHTTP(w, r)
	})
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening for the front: %v", err)
	}
	server := &http.Server{Handler: handler, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(func() { _ = server.Close() })
	front := rest.CopyConfig(upstream)
	front.Host = "http://" + listener.Addr().String()
	front.TLSClientConfig = rest.TLSClientConfig{}
	front.BearerToken, front.BearerTokenFile = "", ""
	front.Username, front.Password = "", ""
	front.ExecProvider, front.AuthProvider = nil, nil
	return front
}

// executor runs exec requests in the testbed kubelets' containers.
type executor struct {
	dirs []string
	api  clientset.Interface
}

// container is what a testbed kubelet publishes for a running container: the command line that
// enters it (ending in `--`) and its environment.
type container struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env"`
}

func flagSet(r *http.Request, name string) bool {
	v := r.URL.Query().Get(name)
	return v == "true" || v == "1"
}

func (e *executor) serve(w http.ResponseWriter, r *http.Request, namespace, pod string) {
	query := r.URL.Query()
	name := query.Get("container")
	command := query["command"]
	if len(command) == 0 {
		http.Error(w, "exec: no command given", http.StatusBadRequest)
		return
	}
	object, err := e.api.CoreV1().Pods(namespace).Get(r.Context(), pod, metav1.GetOptions{})
	if err != nil {
		http.Error(w, fmt.Sprintf("exec: pod %s/%s: %v", namespace, pod, err), http.StatusNotFound)
		return
	}
	if name == "" && len(object.Spec.Containers) > 0 {
		name = object.Spec.Containers[0].Name
	}
	options := &remotecommand.Options{
		Stdin:  flagSet(r, "stdin"),
		Stdout: flagSet(r, "stdout"),
		Stderr: flagSet(r, "stderr"),
		TTY:    flagSet(r, "tty"),
	}
	remotecommand.ServeExec(w, r, e, namespace+"_"+pod, string(object.UID), name, command, options,
		4*time.Hour, 30*time.Second, remotecommandconsts.SupportedStreamingProtocols)
}

// ExecInContainer runs cmd in the container that `pod` (namespace_name) and `name` designate.
func (e *executor) ExecInContainer(ctx context.Context, pod, _ string, name string, cmd []string,
	in io.Reader, out, errOut io.WriteCloser, _ bool, _ <-chan remotecommand.TerminalSize,
	_ time.Duration) error {
	state, err := e.find(pod + "_" + name)
	if err != nil {
		return err
	}
	argv := append(append([]string{}, state.Argv...), cmd...)
	c := exec.CommandContext(ctx, argv[0], argv[1:]...)
	c.Env = state.Env
	if in != nil {
		c.Stdin = in
	}
	if out != nil {
		c.Stdout = out
	}
	if errOut != nil {
		c.Stderr = errOut
	}
	err = c.Run()
	if exit, ok := err.(*exec.ExitError); ok {
		return utilexec.CodeExitError{Err: exit, Code: exit.ExitCode()}
	}
	return err
}

// find reads the description of a running container from the kubelets' directories.
func (e *executor) find(key string) (*container, error) {
	for _, dir := range e.dirs {
		data, err := os.ReadFile(filepath.Join(dir, key+".json"))
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading the description of container %s: %w", key, err)
		}
		var state container
		if err := json.Unmarshal(data, &state); err != nil {
			return nil, fmt.Errorf("the description of container %s in %s: %w", key, dir, err)
		}
		if len(state.Argv) == 0 {
			return nil, fmt.Errorf("the description of container %s in %s has no argv", key, dir)
		}
		return &state, nil
	}
	return nil, fmt.Errorf("container %s is not running on any testbed node (looked in %v)", key, e.dirs)
}
