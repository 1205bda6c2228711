package fsm

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// CommandFormat is the envelope format this package writes and understands.
const CommandFormat = 1

// ErrMalformedCommand is wrapped by DecodeCommand when the bytes are not a
// Cabinet command envelope at all.
var ErrMalformedCommand = errors.New("malformed command")

var deterministic = proto.MarshalOptions{Deterministic: true}

// NewCommand builds a format-1 envelope around payload. The leader stamps
// LeaderTimeUnixNano just before it appends the entry; NewCommand leaves it 0.
// A nil payload gives an empty payload (valid for COMMAND_TYPE_NOOP).
func NewCommand(t fsmpb.CommandType, payload proto.Message, requestID, principal string) (*fsmpb.Command, error) {
	var data []byte
	if payload != nil {
		var err error
		data, err = deterministic.Marshal(payload)
		if err != nil {
			return nil, fmt.Errorf("encode %s payload: %w", t, err)
		}
	}
	return &fsmpb.Command{
		Format:    CommandFormat,
		Type:      t,
		RequestId: requestID,
		Principal: principal,
		Payload:   data,
		Ignorable: ignorableTypes[t],
	}, nil
}

// ignorableTypes may be skipped by nodes that do not know them (older
// releases): they only record facts those nodes have no use for.
var ignorableTypes = map[fsmpb.CommandType]bool{
	fsmpb.CommandType_COMMAND_TYPE_SET_NODE_FEATURE_LEVEL: true,
}

// EncodeCommand serializes cmd for raft.Apply.
func EncodeCommand(cmd *fsmpb.Command) ([]byte, error) {
	if cmd == nil {
		return nil, errors.New("encode command: nil command")
	}
	b, err := deterministic.Marshal(cmd)
	if err != nil {
		return nil, fmt.Errorf("encode command: %w", err)
	}
	return b, nil
}

// DecodeCommand parses a Raft log entry's data. It rejects bytes that are not
// an envelope (empty data, wire-format garbage, or format 0, which no Cabinet
// version ever wrote). A well-formed envelope of an unknown newer format is
// returned as is: State.Apply must see it to refuse it loudly.
func DecodeCommand(data []byte) (*fsmpb.Command, error) {
	if len(data) == 0 {
		return nil, fmt.Errorf("%w: empty log entry", ErrMalformedCommand)
	}
	cmd := &fsmpb.Command{}
	if err := proto.Unmarshal(data, cmd); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformedCommand, err)
	}
	if cmd.GetFormat() == 0 {
		return nil, fmt.Errorf("%w: envelope has no format", ErrMalformedCommand)
	}
	return cmd, nil
}

// EncodeResult serializes a Result (for forwarding a write's outcome from the
// leader to the node that received the request).
func EncodeResult(res *fsmpb.Result) ([]byte, error) {
	if res == nil {
		return nil, errors.New("encode result: nil result")
	}
	b, err := deterministic.Marshal(res)
	if err != nil {
		return nil, fmt.Errorf("encode result: %w", err)
	}
	return b, nil
}

// DecodeResult parses bytes written by EncodeResult.
func DecodeResult(data []byte) (*fsmpb.Result, error) {
	res := &fsmpb.Result{}
	if err := proto.Unmarshal(data, res); err != nil {
		return nil, fmt.Errorf("decode result: %w", err)
	}
	return res, nil
}
