// go-bench drives the ttrpc.interop.v1.Interop Echo method with the Go ttrpc
// client, for bench/run.py.
//
// Usage: go-bench -addr ADDRESS -size N [-lat-calls N] [-warmup N]
//
//	[-inflight 1,8,64] [-duration SECONDS] [-repeats N] [-max-calls N] [-lat-seconds S]
//
// It measures one-call-in-flight latency (-lat-calls calls after -warmup),
// then calls/s for each -inflight level (goroutines sharing one connection;
// the median of -repeats runs, each bounded by -duration and -max-calls),
// and prints one JSON object
// on stdout. -lat-calls 0 skips the latency phase; -inflight "" skips the
// throughput phase.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/ttrpc"

	"ttrpcinterop/interop"
)

type latency struct {
	Calls  int     `json:"calls"`
	P50us  float64 `json:"p50_us"`
	P99us  float64 `json:"p99_us"`
	MeanUs float64 `json:"mean_us"`
}

type level struct {
	Inflight    int       `json:"inflight"`
	Calls       int64     `json:"calls"`
	Seconds     float64   `json:"seconds"`
	CallsPerSec float64   `json:"calls_per_s"`
	Runs        []float64 `json:"runs,omitempty"`
}

type result struct {
	Latency    *latency `json:"latency,omitempty"`
	Throughput []level  `json:"throughput"`
}

func socketPath(address string) string {
	return strings.TrimPrefix(address, "unix://")
}

func echo(ctx context.Context, svc interop.InteropService, req *interop.EchoRequest) error {
	resp, err := svc.Echo(ctx, req)
	if err != nil {
		return err
	}
	if len(resp.Data) != len(req.Data) {
		return fmt.Errorf("echo returned %d bytes, sent %d", len(resp.Data), len(req.Data))
	}
	return nil
}

func measureLatency(svc interop.InteropService, req *interop.EchoRequest, warmup, calls int, limit time.Duration) (*latency, error) {
	ctx := context.Background()
	for i := 0; i < warmup; i++ {
		if err := echo(ctx, svc, req); err != nil {
			return nil, err
		}
	}
	samples := make([]time.Duration, 0, calls)
	stop := time.Now().Add(limit)
	var total time.Duration
	for i := 0; i < calls; i++ {
		t0 := time.Now()
		if err := echo(ctx, svc, req); err != nil {
			return nil, err
		}
		d := time.Since(t0)
		samples = append(samples, d)
		total += d
		if time.Now().After(stop) {
			break
		}
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	pct := func(p float64) float64 {
		idx := int(p * float64(len(samples)-1))
		return float64(samples[idx].Nanoseconds()) / 1e3
	}
	return &latency{
		Calls:  len(samples),
		P50us:  pct(0.50),
		P99us:  pct(0.99),
		MeanUs: float64(total.Nanoseconds()) / 1e3 / float64(len(samples)),
	}, nil
}

func measureThroughput(svc interop.InteropService, req *interop.EchoRequest, inflight int, duration time.Duration, maxCalls int64) (level, error) {
	ctx := context.Background()
	var issued, done int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	stop := start.Add(duration)
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for atomic.AddInt64(&issued, 1) <= maxCalls && time.Now().Before(stop) {
				if err := echo(ctx, svc, req); err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
				atomic.AddInt64(&done, 1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	return level{Inflight: inflight, Calls: done, Seconds: elapsed, CallsPerSec: float64(done) / elapsed}, firstErr
}

// medianRun returns the run with the median rate, listing every run's rate.
func medianRun(runs []level) level {
	rates := make([]float64, len(runs))
	for i, r := range runs {
		rates[i] = r.CallsPerSec
	}
	sorted := append([]level(nil), runs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].CallsPerSec < sorted[j].CallsPerSec })
	m := sorted[(len(sorted)-1)/2]
	m.Runs = rates
	return m
}

func run() error {
	addr := flag.String("addr", "", "server address (unix:///path or a path)")
	size := flag.Int("size", 16, "payload bytes (EchoRequest.data)")
	warmup := flag.Int("warmup", 1000, "warmup calls before each phase")
	latCalls := flag.Int("lat-calls", 10000, "calls for the latency phase (0: skip)")
	latSeconds := flag.Float64("lat-seconds", 30, "time bound of the latency phase")
	inflightList := flag.String("inflight", "1,8,64", "comma-separated concurrency levels")
	duration := flag.Float64("duration", 1, "seconds per run of a concurrency level")
	repeats := flag.Int("repeats", 3, "runs per concurrency level (the median is kept)")
	maxCalls := flag.Int64("max-calls", 1000000, "call bound per run")
	flag.Parse()
	if *addr == "" {
		return errors.New("-addr is required")
	}

	conn, err := net.Dial("unix", socketPath(*addr))
	if err != nil {
		return err
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	svc := interop.NewInteropClient(client)
	req := &interop.EchoRequest{Data: bytes.Repeat([]byte{'x'}, *size)}

	var res result
	if *latCalls > 0 {
		lat, err := measureLatency(svc, req, *warmup, *latCalls, time.Duration(*latSeconds*float64(time.Second)))
		if err != nil {
			return fmt.Errorf("latency: %w", err)
		}
		res.Latency = lat
	}
	res.Throughput = []level{}
	for _, f := range strings.Split(*inflightList, ",") {
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return fmt.Errorf("bad -inflight entry %q", f)
		}
		if *warmup > 0 {
			warm := time.Duration(math.Min(0.2, *duration/2) * float64(time.Second))
			if _, err := measureThroughput(svc, req, n, warm, int64(*warmup)); err != nil {
				return fmt.Errorf("warmup at %d in flight: %w", n, err)
			}
		}
		var runs []level
		for r := 0; r < *repeats; r++ {
			lvl, err := measureThroughput(svc, req, n, time.Duration(*duration*float64(time.Second)), *maxCalls)
			if err != nil {
				return fmt.Errorf("%d in flight: %w", n, err)
			}
			runs = append(runs, lvl)
		}
		res.Throughput = append(res.Throughput, medianRun(runs))
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "go-bench:", err)
		os.Exit(1)
	}
}
