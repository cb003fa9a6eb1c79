package main

// Checks that go through the real Go ttrpc client.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"ttrpcinterop/interop"
)

const (
	interopService = "ttrpc.interop.v1.Interop"
	failDetailURL  = "type.googleapis.com/ttrpc.interop.v1.FailDetail"
)

// wantCode checks that err is a ttrpc status error with the given code.
func wantCode(err error, want codes.Code) error {
	if err == nil {
		return fmt.Errorf("call succeeded, want status %v", want)
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("got error %q without a status, want status %v", err, want)
	}
	if st.Code() != want {
		return fmt.Errorf("got status %v (%q), want %v", st.Code(), st.Message(), want)
	}
	return nil
}

// within checks that d lies in [lo, hi].
func within(what string, d, lo, hi time.Duration) error {
	if d < lo || d > hi {
		return fmt.Errorf("%s took %v, want between %v and %v", what, d.Round(time.Millisecond), lo, hi)
	}
	return nil
}

func echo(ctx context.Context, svc interop.InteropService, req *interop.EchoRequest) error {
	resp, err := svc.Echo(ctx, req)
	if err != nil {
		return fmt.Errorf("Echo: %v", err)
	}
	if !bytes.Equal(resp.Data, req.Data) {
		return fmt.Errorf("Echo: data mismatch (%d bytes sent, %d received)", len(req.Data), len(resp.Data))
	}
	if resp.Text != req.Text {
		return fmt.Errorf("Echo: text %q, want %q", resp.Text, req.Text)
	}
	if resp.Number != req.Number {
		return fmt.Errorf("Echo: number %d, want %d", resp.Number, req.Number)
	}
	return nil
}

// echoWorks is the "connection still usable" probe used after edge cases.
func echoWorks(svc interop.InteropService) error {
	err := echo(context.Background(), svc, &interop.EchoRequest{Data: []byte("still"), Text: "alive", Number: 42})
	if err != nil {
		return fmt.Errorf("connection unusable afterwards: %v", err)
	}
	return nil
}

func checkEchoEmpty(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	return echo(context.Background(), svc, &interop.EchoRequest{})
}

func checkEchoBinary(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	data := make([]byte, 4*256)
	for i := range data {
		data[i] = byte(255 - i%256)
	}
	for _, d := range [][]byte{{0}, {0xff, 0x00, 0x80}, data} {
		if err := echo(context.Background(), svc, &interop.EchoRequest{Data: d}); err != nil {
			return err
		}
	}
	return nil
}

func checkEchoUnicode(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	for _, text := range []string{"plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🚀🧪", "nul \x00 inside", "\u200b\ufeff\U0010ffff"} {
		if err := echo(context.Background(), svc, &interop.EchoRequest{Text: text}); err != nil {
			return err
		}
	}
	return nil
}

func checkEchoInt64(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	for _, n := range []int64{math.MinInt64, math.MaxInt64, -1, 1, math.MinInt32 - 1, math.MaxUint32 + 1} {
		req := &interop.EchoRequest{Data: []byte{1, 2, 3}, Text: "n", Number: n}
		if err := echo(context.Background(), svc, req); err != nil {
			return err
		}
	}
	return nil
}

func checkEchoOneMiB(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	return echo(context.Background(), svc, &interop.EchoRequest{Data: data, Text: "big", Number: 1 << 20})
}

// checkMultiplexed runs 100 calls at once on one connection: every fourth
// one is a 100ms Sleep, the rest are Echos with distinct contents.
func checkMultiplexed(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	const calls = 100
	const sleep = 100 * time.Millisecond
	errs := make(chan error, calls)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < calls; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if i%4 == 0 {
				resp, err := svc.Sleep(context.Background(), &interop.SleepRequest{DurationMs: sleep.Milliseconds()})
				if err != nil {
					errs <- fmt.Errorf("call %d: Sleep: %v", i, err)
				} else if resp.SleptMs < sleep.Milliseconds() {
					errs <- fmt.Errorf("call %d: slept_ms %d < %d", i, resp.SleptMs, sleep.Milliseconds())
				}
				return
			}
			req := &interop.EchoRequest{
				Data:   bytes.Repeat([]byte{byte(i)}, i),
				Text:   fmt.Sprintf("call %d", i),
				Number: int64(i)*1_000_000_007 - 3,
			}
			if err := echo(context.Background(), svc, req); err != nil {
				errs <- fmt.Errorf("call %d: %v", i, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	// 25 sleeps of 100ms: served one after another they would take 2.5s.
	if elapsed := time.Since(start); elapsed > 1500*time.Millisecond {
		return fmt.Errorf("calls do not overlap: 25 x %v sleeps took %v", sleep, elapsed.Round(time.Millisecond))
	}
	return nil
}

func checkManyConnections(e *env) error {
	const conns = 20
	errs := make(chan error, conns)
	for i := 0; i < conns; i++ {
		_, svc, err := e.client()
		if err != nil {
			return err
		}
		go func(i int) {
			errs <- echo(context.Background(), svc, &interop.EchoRequest{Text: fmt.Sprintf("connection %d", i), Number: int64(i)})
		}(i)
	}
	for i := 0; i < conns; i++ {
		if err := <-errs; err != nil {
			return err
		}
	}
	return nil
}

// checkConnectionLimit: with the server's -limit connections served, one
// more connection is answered ResourceExhausted, then closed (the Go client
// reports ErrClosed after that); the served ones go on, and once one of them
// closes a new connection is served.
func checkConnectionLimit(e *env) error {
	var served []*ttrpc.Client
	for i := 0; i < e.limit; i++ {
		c, svc, err := e.client()
		if err != nil {
			return err
		}
		if err := echoWorks(svc); err != nil {
			return fmt.Errorf("connection %d of %d: %v", i+1, e.limit, err)
		}
		served = append(served, c)
	}
	_, over, err := e.client()
	if err != nil {
		return err
	}
	_, err = over.Echo(context.Background(), &interop.EchoRequest{Text: "one too many"})
	if err := wantCode(err, codes.ResourceExhausted); err != nil {
		return fmt.Errorf("over the limit: %v", err)
	}
	st, _ := status.FromError(err)
	note("over the limit: %v", st.Message())
	_, err = over.Echo(context.Background(), &interop.EchoRequest{Text: "again"})
	if !errors.Is(err, ttrpc.ErrClosed) {
		return fmt.Errorf("over the limit, second call: got %v, want ErrClosed", err)
	}
	served[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, svc, err := e.client()
		if err != nil {
			return err
		}
		_, err = svc.Echo(context.Background(), &interop.EchoRequest{Text: "a free slot"})
		if err == nil {
			break
		}
		if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
			return fmt.Errorf("after a served connection closed: %v", err)
		}
	}
	return nil
}

func failOnce(svc interop.InteropService, code codes.Code, message string, details []string) error {
	_, err := svc.Fail(context.Background(), &interop.FailRequest{Code: int32(code), Message: message, Details: details})
	if err := wantCode(err, code); err != nil {
		return err
	}
	st, _ := status.FromError(err)
	if st.Message() != message {
		return fmt.Errorf("code %v: message %q, want %q", code, st.Message(), message)
	}
	got := st.Proto().Details
	if len(got) != len(details) {
		return fmt.Errorf("code %v: %d details, want %d", code, len(got), len(details))
	}
	for i, a := range got {
		if a.TypeUrl != failDetailURL {
			return fmt.Errorf("code %v: detail %d has type_url %q, want %q", code, i, a.TypeUrl, failDetailURL)
		}
		var fd interop.FailDetail
		if err := proto.Unmarshal(a.Value, &fd); err != nil {
			return fmt.Errorf("code %v: detail %d does not decode as FailDetail: %v", code, i, err)
		}
		if fd.Detail != details[i] {
			return fmt.Errorf("code %v: detail %d is %q, want %q", code, i, fd.Detail, details[i])
		}
	}
	return nil
}

func checkFailAllCodes(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	for code := codes.Canceled; code <= codes.Unauthenticated; code++ {
		details := []string{fmt.Sprintf("first for %d", code), "", "dritte Angabe ✓"}
		if err := failOnce(svc, code, fmt.Sprintf("failure %d: %v ñ", code, code), details); err != nil {
			return err
		}
	}
	return nil
}

func checkFailNoDetails(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	if err := failOnce(svc, codes.NotFound, "", nil); err != nil {
		return err
	}
	return failOnce(svc, codes.Aborted, "only a message", nil)
}

func wantPairs(resp *interop.MetadataResponse, want [][2]string) error {
	var got [][2]string
	for _, kv := range resp.Pairs {
		got = append(got, [2]string{kv.Key, kv.Value})
	}
	mismatch := len(got) != len(want)
	for i := 0; !mismatch && i < len(got); i++ {
		mismatch = got[i] != want[i]
	}
	if mismatch {
		return fmt.Errorf("server reported pairs %q, want %q", got, want)
	}
	return nil
}

// checkMetadataMD sends metadata the usual way (ttrpc.MD in the context).
// The Go client sends keys in map order, but the values of one key in
// order, which is all the sorted report depends on.
func checkMetadataMD(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	md := ttrpc.MD{}
	md.Append("key-b", "x")
	md.Append("key-a", "3", "1", "2")
	md.Append("empty", "")
	md.Append("unicode", "wért ✓")
	resp, err := svc.Metadata(ttrpc.WithMetadata(context.Background(), md), &interop.MetadataRequest{})
	if err != nil {
		return fmt.Errorf("Metadata: %v", err)
	}
	return wantPairs(resp, [][2]string{
		{"empty", ""}, {"key-a", "3"}, {"key-a", "1"}, {"key-a", "2"}, {"key-b", "x"}, {"unicode", "wért ✓"},
	})
}

// checkMetadataOrder puts an exact, interleaved list on the wire, with keys
// differing only in case (ttrpc.MD would fold them to lower case).
func checkMetadataOrder(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	ctx := withRawMetadata(context.Background(),
		&ttrpc.KeyValue{Key: "b", Value: "1"},
		&ttrpc.KeyValue{Key: "é", Value: "e-acute"},
		&ttrpc.KeyValue{Key: "a", Value: "x"},
		&ttrpc.KeyValue{Key: "A", Value: "upper"},
		&ttrpc.KeyValue{Key: "b", Value: "2"},
		&ttrpc.KeyValue{Key: "zz", Value: ""},
		&ttrpc.KeyValue{Key: "a", Value: "y"},
		&ttrpc.KeyValue{Key: "b", Value: "0"},
	)
	resp, err := svc.Metadata(ctx, &interop.MetadataRequest{})
	if err != nil {
		return fmt.Errorf("Metadata: %v", err)
	}
	return wantPairs(resp, [][2]string{
		{"A", "upper"}, {"a", "x"}, {"a", "y"}, {"b", "1"}, {"b", "2"}, {"b", "0"}, {"zz", ""}, {"é", "e-acute"},
	})
}

func checkDeadlineAbsent(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	resp, err := svc.Metadata(context.Background(), &interop.MetadataRequest{})
	if err != nil {
		return fmt.Errorf("Metadata: %v", err)
	}
	if resp.HasDeadline || resp.DeadlineRemainingNs != 0 {
		return fmt.Errorf("has_deadline=%v remaining=%dns without any deadline sent", resp.HasDeadline, resp.DeadlineRemainingNs)
	}
	if len(resp.Pairs) != 0 {
		return fmt.Errorf("server reported metadata %v, none was sent", resp.Pairs)
	}
	return nil
}

func checkDeadlineVisible(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := svc.Metadata(ctx, &interop.MetadataRequest{})
	if err != nil {
		return fmt.Errorf("Metadata: %v", err)
	}
	if !resp.HasDeadline {
		return fmt.Errorf("has_deadline false for a call with a 5s deadline")
	}
	left := time.Duration(resp.DeadlineRemainingNs)
	// Far below 5s would mean a unit mix-up (e.g. timeout_nano read as µs).
	if left <= 2*time.Second || left > 5*time.Second {
		return fmt.Errorf("deadline_remaining_ns = %v, want in (2s, 5s]", left)
	}
	return nil
}

// checkDeadlineServer sends timeout_nano = 200ms while the client itself
// waits up to 5s, so the answer must be the server's own DeadlineExceeded.
func checkDeadlineServer(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ctx = withTimeoutNano(ctx, (200 * time.Millisecond).Nanoseconds())
	start := time.Now()
	_, err = svc.Sleep(ctx, &interop.SleepRequest{DurationMs: 2000})
	elapsed := time.Since(start)
	if err := wantCode(err, codes.DeadlineExceeded); err != nil {
		return err
	}
	return within("DeadlineExceeded", elapsed, 150*time.Millisecond, time.Second)
}

// checkDeadlineClient is the ordinary case: a 200ms context deadline. The
// server's answer and the client's own timer race; either may win.
func checkDeadlineClient(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = svc.Sleep(ctx, &interop.SleepRequest{DurationMs: 2000})
	elapsed := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		if err := wantCode(err, codes.DeadlineExceeded); err != nil {
			return err
		}
	}
	if err := within("Sleep(2000ms) with a 200ms deadline", elapsed, 150*time.Millisecond, time.Second); err != nil {
		return err
	}
	return echoWorks(svc)
}

// checkLateResponse: the server ignores the deadline and answers at 800ms;
// the client must give up at 300ms, drop the late answer and keep working.
func checkLateResponse(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = svc.Sleep(ctx, &interop.SleepRequest{DurationMs: 800, IgnoreDeadline: true})
	elapsed := time.Since(start)
	// Go's server leaves the deadline to the handler, so only the client's timer fires;
	// a server that enforces deadlines itself may answer DeadlineExceeded first.
	if !errors.Is(err, context.DeadlineExceeded) && status.Code(err) != codes.DeadlineExceeded {
		return fmt.Errorf("got %v, want DeadlineExceeded", err)
	}
	if err := within("giving up", elapsed, 250*time.Millisecond, 700*time.Millisecond); err != nil {
		return err
	}
	time.Sleep(time.Until(start.Add(1200 * time.Millisecond))) // the late answer has arrived by now
	if err := echoWorks(svc); err != nil {
		return err
	}
	resp, err := svc.Sleep(context.Background(), &interop.SleepRequest{DurationMs: 1})
	if err != nil || resp.SleptMs < 1 {
		return fmt.Errorf("Sleep(1ms) after the late answer: resp=%v err=%v", resp, err)
	}
	return nil
}

func checkUnknownService(e *env) error {
	c, svc, err := e.client()
	if err != nil {
		return err
	}
	err = c.Call(context.Background(), "ttrpc.interop.v1.NoSuchService", "Echo", &interop.EchoRequest{}, &interop.EchoResponse{})
	if err := wantCode(err, codes.Unimplemented); err != nil {
		return err
	}
	return echoWorks(svc)
}

func checkUnknownMethod(e *env) error {
	c, svc, err := e.client()
	if err != nil {
		return err
	}
	err = c.Call(context.Background(), interopService, "NoSuchMethod", &interop.EchoRequest{}, &interop.EchoResponse{})
	if err := wantCode(err, codes.Unimplemented); err != nil {
		return err
	}
	return echoWorks(svc)
}

func wantBigData(data []byte, length int) error {
	if len(data) != length {
		return fmt.Errorf("Big(%d) returned %d bytes", length, len(data))
	}
	for i, b := range data {
		if b != byte(i%251) {
			return fmt.Errorf("Big(%d): data[%d] = %d, want %d", length, i, b, i%251)
		}
	}
	return nil
}

func checkBigSmall(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	for _, n := range []int{0, 1, 250, 251, 252, 4096, 65543} {
		resp, err := svc.Big(context.Background(), &interop.BigRequest{Length: uint32(n)})
		if err != nil {
			return fmt.Errorf("Big(%d): %v", n, err)
		}
		if err := wantBigData(resp.Data, n); err != nil {
			return err
		}
	}
	return nil
}

// bigUnderLimit leaves 64 bytes for the Response and BigResponse framing
// (about 12 bytes with an OK status), so the frame fits in 4 MiB.
const bigUnderLimit = maxFrame - 64

func checkBigUnderLimit(e *env) error {
	_, svc, err := e.client()
	if err != nil {
		return err
	}
	resp, err := svc.Big(context.Background(), &interop.BigRequest{Length: bigUnderLimit})
	if err != nil {
		return fmt.Errorf("Big(%d): %v", bigUnderLimit, err)
	}
	if err := wantBigData(resp.Data, bigUnderLimit); err != nil {
		return err
	}
	return echoWorks(svc)
}
