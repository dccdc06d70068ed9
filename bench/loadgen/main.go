// Command loadgen is the benchmark's compiled gRPC client: it keeps a fixed number of
// unary calls in flight against one method over mutual TLS and reports every latency.
//
// It exists so that the load generator is not the bottleneck on a 2-core machine: a
// grpc.aio client process costs about as much CPU per request as the broker it drives.
// It knows nothing of EdgeKMS's messages: the request arrives already serialized (by the
// Python side, from the real generated classes) and responses come back as raw bytes, so
// no protobuf code is generated here and the wire contract has a single source.
//
// Input: one JSON object on stdin (key material only as file paths, never in argv).
// Output: one JSON object on stdout; diagnostics on stderr.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"math"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// Spec is the input. Times are wall-clock seconds since the epoch so that the window
// lines up with the CPU sampling done by the Python side.
type Spec struct {
	Target      string  `json:"target"`
	ServerName  string  `json:"server_name"`
	CACert      string  `json:"ca_cert"`
	Cert        string  `json:"cert"`
	Key         string  `json:"key"`
	Method      string  `json:"method"`
	Request     string  `json:"request_b64"`
	Inflight    int     `json:"inflight"`
	Connections int     `json:"connections"`
	GoMaxProcs  int     `json:"gomaxprocs"`
	Warmup      float64 `json:"warmup"`
	Duration    float64 `json:"duration"`
	StartAt     float64 `json:"start_at"`
	Timeout     float64 `json:"timeout"`
	Samples     int     `json:"samples"`
}

// RPCError is the first failure seen, as gRPC status code name and message.
type RPCError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Result is the output. Latencies are float64 seconds, little-endian, base64: a 4 s run
// at a few thousand requests per second stays a small, exact document.
type Result struct {
	Count       int       `json:"count"`
	Errors      int       `json:"errors"`
	FirstError  *RPCError `json:"first_error"`
	Latencies   string    `json:"latencies_f64le_b64"`
	Samples     []string  `json:"samples_b64"`
	Connections int       `json:"connections"`
	GoMaxProcs  int       `json:"gomaxprocs"`
	Pid         int       `json:"pid"`
}

// rawCodec passes bytes through untouched: requests are []byte, responses land in *[]byte.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch b := v.(type) {
	case []byte:
		return b, nil
	case *[]byte:
		return *b, nil
	}
	return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = data
	return nil
}

func (rawCodec) Name() string { return "proto" }

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", args...)
	os.Exit(2)
}

func readSpec() Spec {
	var spec Spec
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		fail("bad input: %v", err)
	}
	if spec.Connections <= 0 {
		spec.Connections = 1
	}
	if spec.GoMaxProcs <= 0 {
		spec.GoMaxProcs = 2
	}
	if spec.Timeout <= 0 {
		spec.Timeout = 10
	}
	if spec.Samples <= 0 {
		spec.Samples = 4
	}
	if spec.Target == "" || spec.Method == "" || spec.Inflight <= 0 || spec.Duration <= 0 {
		fail("bad input: target, method, inflight > 0 and duration > 0 are required")
	}
	return spec
}

func tlsConfig(spec Spec) *tls.Config {
	pair, err := tls.LoadX509KeyPair(spec.Cert, spec.Key)
	if err != nil {
		fail("client certificate: %v", err)
	}
	caPEM, err := ioutil.ReadFile(spec.CACert)
	if err != nil {
		fail("CA certificate: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		fail("CA certificate: no PEM certificate in %s", spec.CACert)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		RootCAs:      roots,
		ServerName:   spec.ServerName,
		MinVersion:   tls.VersionTLS12,
	}
}

func wallTime(seconds float64) time.Time {
	whole := math.Floor(seconds)
	return time.Unix(int64(whole), int64((seconds-whole)*1e9))
}

// worker is one caller: it keeps one call in flight until the window closes and keeps
// the latencies of the calls that both started and finished inside it.
type worker struct {
	latencies []float64
	errors    int
	firstErr  error
	samples   [][]byte
}

func (w *worker) run(conn *grpc.ClientConn, spec Spec, request []byte, measureFrom, end time.Time) {
	timeout := time.Duration(spec.Timeout * float64(time.Second))
	for {
		t0 := time.Now()
		if !t0.Before(end) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		var response []byte
		err := conn.Invoke(ctx, spec.Method, request, &response)
		cancel()
		if err != nil {
			w.errors++
			if w.firstErr == nil {
				w.firstErr = err
			}
			continue
		}
		t1 := time.Now()
		if !t0.Before(measureFrom) && t1.Before(end) {
			// time.Now carries a monotonic reading, so Sub is immune to clock steps.
			w.latencies = append(w.latencies, t1.Sub(t0).Seconds())
			if len(w.samples) < 1 {
				w.samples = append(w.samples, response)
			}
		}
	}
}

func main() {
	spec := readSpec()
	runtime.GOMAXPROCS(spec.GoMaxProcs)
	request, err := base64.StdEncoding.DecodeString(spec.Request)
	if err != nil {
		fail("request_b64: %v", err)
	}
	creds := credentials.NewTLS(tlsConfig(spec))
	conns := make([]*grpc.ClientConn, spec.Connections)
	for i := range conns {
		// One ClientConn is one HTTP/2 connection (pick_first), which is what a real
		// client holds; several are an input to see whether one connection limits us.
		options := []grpc.DialOption{
			grpc.WithTransportCredentials(creds),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
		}
		if spec.ServerName != "" {
			// The same :authority as the Python client sends, not the loopback address.
			options = append(options, grpc.WithAuthority(spec.ServerName))
		}
		conns[i], err = grpc.Dial(spec.Target, options...)
		if err != nil {
			fail("dial %s: %v", spec.Target, err)
		}
		// Connect and warm the key path before the clock, as the Python client does.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		var response []byte
		err = conns[i].Invoke(ctx, spec.Method, request, &response, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			st, _ := status.FromError(err)
			fail("first call on connection %d: %s: %s", i, st.Code(), st.Message())
		}
	}
	startAt := wallTime(spec.StartAt)
	measureFrom := startAt.Add(time.Duration(spec.Warmup * float64(time.Second)))
	end := measureFrom.Add(time.Duration(spec.Duration * float64(time.Second)))
	if delay := time.Until(startAt); delay > 0 {
		time.Sleep(delay)
	}
	// A diagnostic for whoever tunes this client, not part of the input contract.
	if path := os.Getenv("LOADGEN_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				defer pprof.StopCPUProfile()
			}
		}
	}

	workers := make([]*worker, spec.Inflight)
	expected := int(spec.Duration*2000/float64(spec.Inflight)) + 16
	var wg sync.WaitGroup
	for i := range workers {
		workers[i] = &worker{latencies: make([]float64, 0, expected)}
		wg.Add(1)
		go func(w *worker, conn *grpc.ClientConn) {
			defer wg.Done()
			w.run(conn, spec, request, measureFrom, end)
		}(workers[i], conns[i%len(conns)])
	}
	wg.Wait()
	for _, conn := range conns {
		conn.Close()
	}

	result := Result{
		Samples:     []string{},
		Connections: spec.Connections,
		GoMaxProcs:  spec.GoMaxProcs,
		Pid:         os.Getpid(),
	}
	var firstErr error
	buf := make([]byte, 0, 8*spec.Inflight*expected)
	var word [8]byte
	for _, w := range workers {
		result.Count += len(w.latencies)
		result.Errors += w.errors
		if firstErr == nil && w.firstErr != nil {
			firstErr = w.firstErr
		}
		for _, s := range w.latencies {
			binary.LittleEndian.PutUint64(word[:], math.Float64bits(s))
			buf = append(buf, word[:]...)
		}
		for _, sample := range w.samples {
			if len(result.Samples) < spec.Samples {
				result.Samples = append(result.Samples, base64.StdEncoding.EncodeToString(sample))
			}
		}
	}
	result.Latencies = base64.StdEncoding.EncodeToString(buf)
	if firstErr != nil {
		// Errors that carry no status (none expected from Invoke) come out as Unknown.
		st, _ := status.FromError(firstErr)
		result.FirstError = &RPCError{Code: st.Code().String(), Message: st.Message()}
	}
	if err := json.NewEncoder(os.Stdout).Encode(&result); err != nil {
		fail("write result: %v", err)
	}
}
