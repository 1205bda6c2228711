SHELL := /bin/bash
GO ?= go
PROTOC_GEN_GO := google.golang.org/protobuf/cmd/protoc-gen-go
PROTOC_GEN_GO_GRPC_VERSION := v1.5.1

.PHONY: proto
proto: ## regenerate protobuf code (needs protoc from Debian's protobuf-compiler)
	@mkdir -p .run/bin
	GOBIN=$(CURDIR)/.run/bin $(GO) install $(PROTOC_GEN_GO)
	GOBIN=$(CURDIR)/.run/bin GOFLAGS= $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	PATH=$(CURDIR)/.run/bin:$$PATH protoc -I . --go_out=paths=source_relative:. fsm/fsmpb/fsm.proto
	PATH=$(CURDIR)/.run/bin:$$PATH protoc -I . -I /usr/include --go_out=paths=source_relative:. --go-grpc_out=paths=source_relative:. transport/cabinetpb/cabinet.proto
