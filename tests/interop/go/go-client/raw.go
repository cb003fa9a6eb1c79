package main

// Protocol checks with hand-built frames on a raw socket.
//
// Frame: uint32 BE payload length, uint32 BE stream id, uint8 type,
// uint8 flags, then the payload (at most 4 MiB).

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
	"google.golang.org/grpc/codes"

	"ttrpcinterop/interop"
)

const (
	headerLen    = 10
	maxFrame     = 4 << 20
	typeRequest  = 1
	typeResponse = 2

	// We still read frames up to this size so that an oversize response
	// can be observed instead of just failing.
	readLimit = 64 << 20
	ioTimeout = 5 * time.Second
)

// garbage is not a valid protobuf message: field 1 claims 127 bytes but
// only 3 follow.
var garbage = []byte{0x0a, 0x7f, 'a', 'b', 'c'}

type header struct {
	length   uint32
	streamID uint32
	typ      byte
	flags    byte
}

func (h header) String() string {
	return fmt.Sprintf("{len=%d id=%d type=%d flags=%d}", h.length, h.streamID, h.typ, h.flags)
}

func appendFrame(b []byte, h header, payload []byte) []byte {
	var hb [headerLen]byte
	binary.BigEndian.PutUint32(hb[0:4], h.length)
	binary.BigEndian.PutUint32(hb[4:8], h.streamID)
	hb[8] = h.typ
	hb[9] = h.flags
	return append(append(b, hb[:]...), payload...)
}

// frame builds a well-formed frame (length taken from the payload).
func frame(streamID uint32, typ byte, payload []byte) []byte {
	return appendFrame(nil, header{length: uint32(len(payload)), streamID: streamID, typ: typ}, payload)
}

func requestPayload(method string, msg proto.Message) []byte {
	p, err := proto.Marshal(msg)
	if err != nil {
		panic(err)
	}
	req, err := proto.Marshal(&ttrpc.Request{Service: interopService, Method: method, Payload: p})
	if err != nil {
		panic(err)
	}
	return req
}

func echoFrame(streamID uint32, text string) []byte {
	return frame(streamID, typeRequest, requestPayload("Echo", &interop.EchoRequest{Text: text}))
}

type rawConn struct {
	conn net.Conn
	r    *bufio.Reader
}

func newRawConn(conn net.Conn) *rawConn {
	return &rawConn{conn: conn, r: bufio.NewReader(conn)}
}

func (c *rawConn) write(b []byte) error {
	c.conn.SetWriteDeadline(time.Now().Add(ioTimeout))
	if _, err := c.conn.Write(b); err != nil {
		return fmt.Errorf("write: %v", err)
	}
	return nil
}

func (c *rawConn) readFrame() (header, []byte, error) {
	c.conn.SetReadDeadline(time.Now().Add(ioTimeout))
	var hb [headerLen]byte
	if _, err := io.ReadFull(c.r, hb[:]); err != nil {
		return header{}, nil, fmt.Errorf("reading frame header: %v", err)
	}
	h := header{
		length:   binary.BigEndian.Uint32(hb[0:4]),
		streamID: binary.BigEndian.Uint32(hb[4:8]),
		typ:      hb[8],
		flags:    hb[9],
	}
	if h.length > readLimit {
		return h, nil, fmt.Errorf("frame %v: absurd length", h)
	}
	p := make([]byte, h.length)
	if _, err := io.ReadFull(c.r, p); err != nil {
		return h, nil, fmt.Errorf("reading %d byte payload of %v: %v", h.length, h, err)
	}
	return h, p, nil
}

// readResponse reads one frame and checks that it is a well-formed
// response within the frame limit.
func (c *rawConn) readResponse() (uint32, *ttrpc.Response, error) {
	h, p, err := c.readFrame()
	if err != nil {
		return 0, nil, err
	}
	if h.typ != typeResponse || h.flags != 0 || h.length > maxFrame {
		return h.streamID, nil, fmt.Errorf("got frame %v, want a response (type 2, flags 0, len <= %d)", h, maxFrame)
	}
	var resp ttrpc.Response
	if err := proto.Unmarshal(p, &resp); err != nil {
		return h.streamID, nil, fmt.Errorf("undecodable Response on stream %d: %v", h.streamID, err)
	}
	return h.streamID, &resp, nil
}

// expectStatus reads one response and checks its stream id and code.
func (c *rawConn) expectStatus(streamID uint32, want codes.Code) (*ttrpc.Response, error) {
	id, resp, err := c.readResponse()
	if err != nil {
		return nil, err
	}
	if id != streamID {
		return nil, fmt.Errorf("got a response on stream %d (%v), want one on stream %d", id, statusOf(resp), streamID)
	}
	if got := codes.Code(resp.Status.GetCode()); got != want {
		return nil, fmt.Errorf("stream %d: got %v, want %v", id, statusOf(resp), want)
	}
	return resp, nil
}

// expectEcho reads one response and checks it answers Echo{text} on
// streamID.
func (c *rawConn) expectEcho(streamID uint32, text string) error {
	resp, err := c.expectStatus(streamID, codes.OK)
	if err != nil {
		return err
	}
	return wantEchoText(resp, text)
}

func wantEchoText(resp *ttrpc.Response, text string) error {
	var er interop.EchoResponse
	if err := proto.Unmarshal(resp.Payload, &er); err != nil {
		return fmt.Errorf("undecodable EchoResponse: %v", err)
	}
	if er.Text != text {
		return fmt.Errorf("echo text %q, want %q", er.Text, text)
	}
	return nil
}

// stillWorks sends an Echo on streamID and expects its answer: the
// connection survived whatever came before.
func (c *rawConn) stillWorks(streamID uint32) error {
	if err := c.write(echoFrame(streamID, "still alive")); err != nil {
		return fmt.Errorf("connection unusable afterwards: %v", err)
	}
	if err := c.expectEcho(streamID, "still alive"); err != nil {
		return fmt.Errorf("connection unusable afterwards: %v", err)
	}
	return nil
}

func statusOf(resp *ttrpc.Response) string {
	if resp == nil {
		return "no response"
	}
	return fmt.Sprintf("status %v %q", codes.Code(resp.Status.GetCode()), resp.Status.GetMessage())
}

func checkRawEcho(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	if err := c.write(echoFrame(1, "raw hello")); err != nil {
		return err
	}
	if err := c.expectEcho(1, "raw hello"); err != nil {
		return err
	}
	return c.stillWorks(3)
}

func checkRawEvenID(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	if err := c.write(echoFrame(2, "even")); err != nil {
		return err
	}
	if _, err := c.expectStatus(2, codes.InvalidArgument); err != nil {
		return err
	}
	return c.stillWorks(3)
}

// checkRawOversizeRequest announces (and sends) a 4 MiB + 1 byte request.
func checkRawOversizeRequest(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	const size = maxFrame + 1
	body := make([]byte, size)
	copy(body, requestPayload("Echo", &interop.EchoRequest{Text: "too big"}))
	b := appendFrame(nil, header{length: size, streamID: 1, typ: typeRequest}, body)
	// The server may answer before it has swallowed the whole body, so
	// write concurrently with reading.
	written := make(chan error, 1)
	go func() { written <- c.write(b) }()
	if _, err := c.expectStatus(1, codes.ResourceExhausted); err != nil {
		return err
	}
	if err := <-written; err != nil {
		return err
	}
	return c.stillWorks(3)
}

// checkRawExactLimit sends a request frame whose payload is exactly 4 MiB:
// the limit is inclusive, so it must be served normally.
func checkRawExactLimit(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	echoReq := &interop.EchoRequest{Data: make([]byte, maxFrame-64)}
	payload := requestPayload("Echo", echoReq)
	for len(payload) != maxFrame {
		echoReq.Data = make([]byte, len(echoReq.Data)+maxFrame-len(payload))
		payload = requestPayload("Echo", echoReq)
	}
	written := make(chan error, 1)
	go func() { written <- c.write(frame(1, typeRequest, payload)) }()
	resp, err := c.expectStatus(1, codes.OK)
	if err != nil {
		return err
	}
	if err := <-written; err != nil {
		return err
	}
	var er interop.EchoResponse
	if err := proto.Unmarshal(resp.Payload, &er); err != nil {
		return fmt.Errorf("undecodable EchoResponse: %v", err)
	}
	if len(er.Data) != len(echoReq.Data) {
		return fmt.Errorf("echoed %d bytes, want %d", len(er.Data), len(echoReq.Data))
	}
	return c.stillWorks(3)
}

func checkRawUnknownType(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	b := frame(1, 0x7f, []byte("an unknown frame type must be ignored"))
	b = appendFrame(b, header{length: 3, streamID: 0, typ: 0x7f, flags: 0xff}, []byte{1, 2, 3})
	if err := c.write(b); err != nil {
		return err
	}
	// Nothing may answer the unknown frames: the next frame must be the
	// Echo answer on stream 3.
	return c.stillWorks(3)
}

func checkRawGarbageRequest(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	if err := c.write(frame(1, typeRequest, garbage)); err != nil {
		return err
	}
	if _, err := c.expectStatus(1, codes.InvalidArgument); err != nil {
		return err
	}
	return c.stillWorks(3)
}

func checkRawGarbagePayload(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	req, _ := proto.Marshal(&ttrpc.Request{Service: interopService, Method: "Echo", Payload: garbage})
	if err := c.write(frame(1, typeRequest, req)); err != nil {
		return err
	}
	if _, err := c.expectStatus(1, codes.Internal); err != nil {
		return err
	}
	return c.stillWorks(3)
}

func checkRawByteByByte(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	for _, b := range echoFrame(1, "one byte at a time") {
		if err := c.write([]byte{b}); err != nil {
			return err
		}
		time.Sleep(time.Millisecond)
	}
	if err := c.expectEcho(1, "one byte at a time"); err != nil {
		return err
	}
	return c.stillWorks(3)
}

func checkRawTwoInOneWrite(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	want := map[uint32]string{1: "first", 3: "second"}
	if err := c.write(append(echoFrame(1, want[1]), echoFrame(3, want[3])...)); err != nil {
		return err
	}
	for len(want) > 0 { // the answers may come in either order
		id, resp, err := c.readResponse()
		if err != nil {
			return err
		}
		text, ok := want[id]
		if !ok {
			return fmt.Errorf("unexpected response on stream %d", id)
		}
		if resp.Status.GetCode() != 0 {
			return fmt.Errorf("stream %d: %v", id, statusOf(resp))
		}
		if err := wantEchoText(resp, text); err != nil {
			return fmt.Errorf("stream %d: %v", id, err)
		}
		delete(want, id)
	}
	return c.stillWorks(5)
}

// checkBigOverLimit asks for a response that cannot fit in one frame.
// A conforming server answers ResourceExhausted on that stream; Go ttrpc
// 1.1.1 instead sends the oversize frame anyway, which is tolerated unless
// strict. Either way the connection must keep working. (This goes over a
// raw socket because the Go 1.1.1 client crashes on an oversize frame.)
func checkBigOverLimit(strict bool) func(e *env) error {
	return func(e *env) error {
		c, err := e.raw()
		if err != nil {
			return err
		}
		const length = maxFrame + 1024
		if err := c.write(frame(1, typeRequest, requestPayload("Big", &interop.BigRequest{Length: length}))); err != nil {
			return err
		}
		h, p, err := c.readFrame()
		if err != nil {
			return err
		}
		if h.streamID != 1 || h.typ != typeResponse {
			return fmt.Errorf("got frame %v, want a response on stream 1", h)
		}
		var resp ttrpc.Response
		if err := proto.Unmarshal(p, &resp); err != nil {
			return fmt.Errorf("undecodable Response: %v", err)
		}
		code := codes.Code(resp.Status.GetCode())
		switch {
		case h.length > maxFrame && !strict:
			note("big/over-limit: server sent an oversize %d byte frame (%v) instead of an error", h.length, statusOf(&resp))
		case h.length > maxFrame:
			return fmt.Errorf("server sent an oversize %d byte frame, want a ResourceExhausted status", h.length)
		case code != codes.ResourceExhausted:
			return fmt.Errorf("got %v, want ResourceExhausted", statusOf(&resp))
		}
		return c.stillWorks(3)
	}
}

// checkStrictReusedID sends a second request on an already used stream id.
func checkStrictReusedID(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	if err := c.write(echoFrame(1, "first use")); err != nil {
		return err
	}
	if err := c.expectEcho(1, "first use"); err != nil {
		return err
	}
	if err := c.write(echoFrame(1, "reused")); err != nil {
		return err
	}
	_, err = c.expectStatus(1, codes.InvalidArgument)
	return err
}

// checkStrictLowerID sends stream 3 after stream 5.
func checkStrictLowerID(e *env) error {
	c, err := e.raw()
	if err != nil {
		return err
	}
	if err := c.write(echoFrame(5, "five")); err != nil {
		return err
	}
	if err := c.expectEcho(5, "five"); err != nil {
		return err
	}
	if err := c.write(echoFrame(3, "three")); err != nil {
		return err
	}
	_, err = c.expectStatus(3, codes.InvalidArgument)
	return err
}
