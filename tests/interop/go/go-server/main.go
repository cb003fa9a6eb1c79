// go-server serves the ttrpc.interop.v1.Interop service with the Go ttrpc
// server, so that a ttrpc client under test can be checked against the
// reference implementation.
//
// Usage: go-server ADDRESS [-require-same-user]
//
// It prints READY on stdout once the socket is listening and exits 0 on
// SIGTERM or SIGINT.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
	"github.com/golang/protobuf/ptypes/any"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"ttrpcinterop/cli"
	"ttrpcinterop/interop"
)

const failDetailURL = "type.googleapis.com/ttrpc.interop.v1.FailDetail"

// service implements interop.InteropService; the semantics of every method
// are written down in interop.proto.
type service struct{}

func (service) Echo(ctx context.Context, req *interop.EchoRequest) (*interop.EchoResponse, error) {
	return &interop.EchoResponse{Data: req.Data, Text: req.Text, Number: req.Number}, nil
}

func (service) Fail(ctx context.Context, req *interop.FailRequest) (*interop.FailResponse, error) {
	if req.Code == int32(codes.OK) {
		return nil, status.Error(codes.InvalidArgument, "Fail: code 0 is not a failure")
	}
	st := &spb.Status{Code: req.Code, Message: req.Message}
	for _, d := range req.Details {
		value, err := proto.Marshal(&interop.FailDetail{Detail: d})
		if err != nil {
			return nil, status.Errorf(codes.Internal, "Fail: marshal detail: %v", err)
		}
		st.Details = append(st.Details, &any.Any{TypeUrl: failDetailURL, Value: value})
	}
	return nil, status.ErrorProto(st)
}

func (service) Sleep(ctx context.Context, req *interop.SleepRequest) (*interop.SleepResponse, error) {
	start := time.Now()
	timer := time.NewTimer(time.Duration(req.DurationMs) * time.Millisecond)
	defer timer.Stop()

	done := ctx.Done()
	if req.IgnoreDeadline {
		done = nil // a nil channel never fires: sleep the full duration
	}
	select {
	case <-timer.C:
		return &interop.SleepResponse{SleptMs: time.Since(start).Milliseconds()}, nil
	case <-done:
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, status.Errorf(codes.DeadlineExceeded, "Sleep: deadline passed after %v", time.Since(start))
		}
		return nil, status.Errorf(codes.Canceled, "Sleep: %v", ctx.Err())
	}
}

func (service) Metadata(ctx context.Context, req *interop.MetadataRequest) (*interop.MetadataResponse, error) {
	resp := &interop.MetadataResponse{}

	// ttrpc.MD is a map from key to the values in arrival order, so sorting
	// the keys and walking each value list gives the required stable order.
	md, _ := ttrpc.GetMetadata(ctx)
	keys := make([]string, 0, len(md))
	for k := range md {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		for _, v := range md[k] {
			resp.Pairs = append(resp.Pairs, &interop.KeyValue{Key: k, Value: v})
		}
	}

	if deadline, ok := ctx.Deadline(); ok {
		resp.HasDeadline = true
		resp.DeadlineRemainingNs = time.Until(deadline).Nanoseconds()
	}
	return resp, nil
}

func (service) Big(ctx context.Context, req *interop.BigRequest) (*interop.BigResponse, error) {
	data := make([]byte, req.Length)
	for i := range data {
		data[i] = byte(i % 251)
	}
	return &interop.BigResponse{Data: data}, nil
}

func listen(path string) (net.Listener, error) {
	if !cli.IsAbstract(path) {
		// Remove a stale socket left behind by an earlier run, but never
		// anything that is not a socket.
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(path)
		}
	}
	return net.Listen("unix", path)
}

func run() error {
	fs := flag.NewFlagSet("go-server", flag.ContinueOnError)
	sameUser := fs.Bool("require-same-user", false, "refuse peers whose uid/gid differ from ours (SO_PEERCRED)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: go-server ADDRESS [-require-same-user]")
		fs.PrintDefaults()
	}
	args, err := cli.ParseMixed(fs, os.Args[1:])
	if err != nil {
		return err
	}
	if len(args) != 1 {
		fs.Usage()
		return errors.New("exactly one ADDRESS is required")
	}
	path, err := cli.SocketPath(args[0])
	if err != nil {
		return err
	}

	var opts []ttrpc.ServerOpt
	if *sameUser {
		opts = append(opts, ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()))
	}
	server, err := ttrpc.NewServer(opts...)
	if err != nil {
		return err
	}
	interop.RegisterInteropService(server, service{})

	l, err := listen(path)
	if err != nil {
		return err
	}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)

	served := make(chan error, 1)
	go func() { served <- server.Serve(context.Background(), l) }()

	// os.Stdout is unbuffered: READY reaches the reader immediately.
	fmt.Println("READY")

	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-signals:
	}

	// Give in-flight calls a moment to finish, then drop what is left.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	server.Shutdown(ctx)
	server.Close()
	if err := <-served; err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "go-server:", err)
		os.Exit(1)
	}
}
