// go-client is a conformance client for servers implementing
// ttrpc.interop.v1.Interop (see interop.proto). RPC checks go through the
// real Go ttrpc client; protocol checks write hand-built frames on a raw
// socket.
//
// Usage: go-client ADDRESS [-strict] [-run REGEX] [-v] [-limit N]
//
// Output: one "PASS name" or "FAIL name: why" line per check, then
// "N passed, M failed". Exit status 0 only if every check passed.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"

	"ttrpcinterop/cli"
	"ttrpcinterop/interop"
)

const defaultTimeout = 10 * time.Second

// A check is one named conformance test. Strict checks cover behaviour
// that Go ttrpc 1.1.1 itself lacks; they only run with -strict.
type check struct {
	name    string
	strict  bool
	limit   bool          // needs a server started with a connection limit (-limit N)
	timeout time.Duration // 0 means defaultTimeout
	run     func(e *env) error
}

// env hands connections to a check and closes them all when it is over,
// which also unblocks a check that is still stuck after its timeout.
type env struct {
	path  string
	limit int // the server's connection limit (-limit), 0 if none

	mu      sync.Mutex
	closers []io.Closer
}

func (e *env) track(c io.Closer) {
	e.mu.Lock()
	e.closers = append(e.closers, c)
	e.mu.Unlock()
}

func (e *env) closeAll() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, c := range e.closers {
		c.Close()
	}
	e.closers = nil
}

func (e *env) dial() (net.Conn, error) {
	conn, err := net.DialTimeout("unix", e.path, 5*time.Second)
	if err != nil {
		return nil, err
	}
	e.track(conn)
	return conn, nil
}

// client opens a new connection wrapped in a Go ttrpc client.
func (e *env) client() (*ttrpc.Client, interop.InteropService, error) {
	conn, err := e.dial()
	if err != nil {
		return nil, nil, err
	}
	c := ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(applyOverrides))
	e.track(c)
	return c, interop.NewInteropClient(c), nil
}

// raw opens a new connection for hand-built frames.
func (e *env) raw() (*rawConn, error) {
	conn, err := e.dial()
	if err != nil {
		return nil, err
	}
	return newRawConn(conn), nil
}

// overrides lets a check put exact wire values into the ttrpc Request that
// the Go client builds (Request.timeout_nano independent of the context
// deadline, Request.metadata as an ordered list with any key spelling).
type overrides struct {
	timeoutNano *int64
	metadata    []*ttrpc.KeyValue
}

type overridesKey struct{}

func withTimeoutNano(ctx context.Context, ns int64) context.Context {
	o := overridesFrom(ctx)
	o.timeoutNano = &ns
	return context.WithValue(ctx, overridesKey{}, o)
}

func withRawMetadata(ctx context.Context, kvs ...*ttrpc.KeyValue) context.Context {
	o := overridesFrom(ctx)
	o.metadata = kvs
	return context.WithValue(ctx, overridesKey{}, o)
}

func overridesFrom(ctx context.Context) overrides {
	o, _ := ctx.Value(overridesKey{}).(overrides)
	return o
}

func applyOverrides(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, _ *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
	o := overridesFrom(ctx)
	if o.timeoutNano != nil {
		req.TimeoutNano = *o.timeoutNano
	}
	if o.metadata != nil {
		req.Metadata = o.metadata
	}
	return invoke(ctx, req, resp)
}

// note prints extra information about an observed behaviour on stderr, so
// stdout keeps its strict PASS/FAIL format.
func note(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "note: "+format+"\n", args...)
}

func runCheck(path string, limit int, c check) (err error) {
	timeout := c.timeout
	if timeout == 0 {
		timeout = defaultTimeout
	}
	e := &env{path: path, limit: limit}
	defer e.closeAll()

	done := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- fmt.Errorf("panic: %v", r)
			}
		}()
		done <- c.run(e)
	}()
	select {
	case err = <-done:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("timed out after %v", timeout)
	}
}

func run() int {
	fs := flag.NewFlagSet("go-client", flag.ContinueOnError)
	strict := fs.Bool("strict", false, "also run checks for behaviour Go ttrpc 1.1.1 lacks")
	filter := fs.String("run", "", "only run checks whose name matches this regular expression")
	verbose := fs.Bool("v", false, "show the Go ttrpc client's own log output")
	list := fs.Bool("list", false, "list the check names and exit")
	limit := fs.Int("limit", 0, "the server's connection limit: run only the checks of it")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: go-client ADDRESS [-strict] [-run REGEX] [-v] [-list] [-limit N]")
		fs.PrintDefaults()
	}
	args, err := cli.ParseMixed(fs, os.Args[1:])
	if err != nil {
		return 2
	}
	if !*verbose {
		// Keep the Go ttrpc client's logrus chatter (e.g. about responses
		// on unknown streams) out of the way unless asked for.
		logrus.SetOutput(io.Discard)
	}
	re, err := regexp.Compile(*filter)
	if err != nil {
		fmt.Fprintln(os.Stderr, "go-client: bad -run:", err)
		return 2
	}

	var selected []check
	for _, c := range checks() {
		if (c.strict && !*strict) || !re.MatchString(c.name) || c.limit != (*limit > 0) {
			continue
		}
		selected = append(selected, c)
	}
	if *list {
		for _, c := range selected {
			fmt.Println(c.name)
		}
		return 0
	}
	if len(args) != 1 {
		fs.Usage()
		return 2
	}
	path, err := cli.SocketPath(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "go-client:", err)
		return 2
	}

	passed, failed := 0, 0
	for _, c := range selected {
		if err := runCheck(path, *limit, c); err != nil {
			failed++
			fmt.Printf("FAIL %s: %s\n", c.name, strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			passed++
			fmt.Printf("PASS %s\n", c.name)
		}
	}
	fmt.Printf("%d passed, %d failed\n", passed, failed)
	if failed > 0 || passed == 0 {
		return 1
	}
	return 0
}

func main() {
	os.Exit(run())
}

func checks() []check {
	return []check{
		{name: "limit/over-the-limit-answered", limit: true, timeout: 30 * time.Second, run: checkConnectionLimit},
		{name: "echo/empty", run: checkEchoEmpty},
		{name: "echo/binary-bytes", run: checkEchoBinary},
		{name: "echo/unicode-text", run: checkEchoUnicode},
		{name: "echo/int64-extremes", run: checkEchoInt64},
		{name: "echo/one-mib", run: checkEchoOneMiB},
		{name: "concurrent/multiplexed-calls", run: checkMultiplexed},
		{name: "concurrent/many-connections", run: checkManyConnections},
		{name: "fail/all-codes-with-details", run: checkFailAllCodes},
		{name: "fail/no-details", run: checkFailNoDetails},
		{name: "metadata/ttrpc-md", run: checkMetadataMD},
		{name: "metadata/order-and-case", run: checkMetadataOrder},
		{name: "deadline/absent", run: checkDeadlineAbsent},
		{name: "deadline/visible-to-handler", run: checkDeadlineVisible},
		{name: "deadline/server-enforced", run: checkDeadlineServer},
		{name: "deadline/client-timeout", run: checkDeadlineClient},
		{name: "deadline/client-gives-up-late-response", run: checkLateResponse},
		{name: "unimplemented/service", run: checkUnknownService},
		{name: "unimplemented/method", run: checkUnknownMethod},
		{name: "big/small-sizes", run: checkBigSmall},
		{name: "big/just-under-limit", timeout: 30 * time.Second, run: checkBigUnderLimit},
		{name: "big/over-limit", timeout: 30 * time.Second, run: checkBigOverLimit(false)},
		{name: "raw/echo", run: checkRawEcho},
		{name: "raw/even-stream-id", run: checkRawEvenID},
		{name: "raw/oversize-request", timeout: 30 * time.Second, run: checkRawOversizeRequest},
		{name: "raw/request-exactly-limit", timeout: 30 * time.Second, run: checkRawExactLimit},
		{name: "raw/unknown-frame-type", run: checkRawUnknownType},
		{name: "raw/undecodable-request", run: checkRawGarbageRequest},
		{name: "raw/undecodable-payload", run: checkRawGarbagePayload},
		{name: "raw/one-byte-writes", run: checkRawByteByByte},
		{name: "raw/two-requests-one-write", run: checkRawTwoInOneWrite},
		{name: "strict/reused-stream-id", strict: true, run: checkStrictReusedID},
		{name: "strict/lower-stream-id", strict: true, run: checkStrictLowerID},
		{name: "strict/big-over-limit-resource-exhausted", strict: true, timeout: 30 * time.Second, run: checkBigOverLimit(true)},
	}
}
