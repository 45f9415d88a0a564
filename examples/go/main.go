// A Go client of llm-gateway, with stubs generated from proto/ by protoc-gen-go and
// protoc-gen-go-grpc, built against Debian's Go packages (no module proxy needed):
//
//	examples/go/build.sh target/go-example      # generates the stubs, builds ./client
//	target/go-example/client 127.0.0.1:50051
//
// It calls Chat and ChatStream (with a deadline) on the built-in `mock/echo` model, and
// checks that invalid input gets INVALID_ARGUMENT with its rich details (ErrorInfo and a
// BadRequest field violation).
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "llmgateway.local/gen/llmgatewayv1"
)

var passed, failed int

func check(name string, ok bool, detail string) {
	if ok {
		passed++
		fmt.Printf("ok   %s\n", name)
	} else {
		failed++
		fmt.Printf("FAIL %s %s\n", name, detail)
	}
}

func user(text string) *pb.Message {
	return &pb.Message{
		Role:    pb.Role_ROLE_USER,
		Content: []*pb.ContentPart{{Part: &pb.ContentPart_Text{Text: text}}},
	}
}

func main() {
	target := "127.0.0.1:50051"
	if len(os.Args) > 1 {
		target = os.Args[1]
	}
	dial, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(dial, target, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fmt.Printf("cannot connect to %s: %v\n", target, err)
		os.Exit(1)
	}
	defer conn.Close()
	client := pb.NewLlmGatewayClient(conn)

	// Chat.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reply, err := client.Chat(ctx, &pb.ChatRequest{Model: "mock/echo", Messages: []*pb.Message{user("hello from go")}})
	if err != nil {
		fmt.Printf("chat failed: %v\n", err)
		os.Exit(1)
	}
	var text strings.Builder
	for _, part := range reply.GetMessage().GetContent() {
		text.WriteString(part.GetText())
	}
	check("unary chat", strings.Contains(text.String(), "hello from go"), text.String())
	check("unary usage", reply.GetUsage().GetInputTokens() > 0, reply.GetUsage().String())

	// ChatStream, with a deadline: the gateway takes it as the call's budget.
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	stream, err := client.ChatStream(sctx, &pb.ChatRequest{Model: "mock/echo", Messages: []*pb.Message{user("stream it")}})
	if err != nil {
		fmt.Printf("chat stream failed: %v\n", err)
		os.Exit(1)
	}
	var events []*pb.ChatStreamResponse
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fmt.Printf("stream failed: %v\n", err)
			os.Exit(1)
		}
		events = append(events, event)
	}
	check("stream starts with start", len(events) > 0 && events[0].GetStart() != nil, "")
	check("stream ends with finish", len(events) > 0 && events[len(events)-1].GetFinish() != nil, "")
	var streamed strings.Builder
	for _, e := range events {
		streamed.WriteString(e.GetDelta().GetText())
	}
	check("stream text", strings.Contains(streamed.String(), "stream it"), streamed.String())

	// An error with its rich details.
	_, err = client.Chat(ctx, &pb.ChatRequest{Model: "", Messages: []*pb.Message{user("x")}})
	st := status.Convert(err)
	check("invalid argument code", st.Code() == codes.InvalidArgument, st.Code().String())
	var reason string
	var fields []string
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			reason = d.GetDomain() + "/" + d.GetReason()
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	check("error info", reason == "llmgateway/INVALID_ARGUMENT", reason)
	check("invalid argument field", strings.Join(fields, ",") == "model", strings.Join(fields, ","))

	models, err := client.ListModels(ctx, &pb.ListModelsRequest{})
	found := false
	for _, m := range models.GetModels() {
		found = found || m.GetId() == "mock/echo"
	}
	check("list models", err == nil && found, fmt.Sprint(err))

	fmt.Printf("go example: %d passed, %d failed\n", passed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}
