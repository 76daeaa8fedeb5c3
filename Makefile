# ktrace build. `make help` lists the targets.
ARCH ?= $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
CLANG ?= clang
LLVM_STRIP ?= llvm-strip
BPFTOOL ?= bpftool
PYTHON ?= python3
VMLINUX := vmlinux/$(ARCH)/vmlinux.h
BPF_SRC := $(wildcard bpf/*.bpf.c)
BPF_HDR := $(wildcard bpf/*.h)
BPF_OBJ := $(patsubst bpf/%.bpf.c,ktrace/bpf/%.bpf.o,$(BPF_SRC))
# Real third-party servers and clients the kernel tests drive, with the tools that give their ground truth:
# a pre-fork web server and its load generator, two DNS servers and dig, conntrack-tools, bpftrace, a bulk
# transfer tool (iperf3) and an HTTP client with a connect timeout of its own (curl).
TEST_SERVERS := nginx-light apache2-utils unbound dnsmasq-base bind9-dnsutils conntrack bpftrace iperf3 curl
# The tool the benchmark compares ktrace with, from the libbpf-tools package.
TCPSTATES := /usr/sbin/tcpstates
BPF_CFLAGS := -g -O2 -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -Ivmlinux/$(ARCH) -Ibpf

ifeq ($(filter $(ARCH),x86 arm64),)
$(error Architecture $(ARCH) is not supported yet)
endif

.DELETE_ON_ERROR:
.PHONY: help setup bpf generate proto vmlinux test test-unit bench bench-paced bench-deps lint clean

help:
	@echo "setup     install what ktrace and its tests need (apt: libbpf1 and the tools below; pip: -e .[test])"
	@echo "bpf       compile and strip the CO-RE objects into ktrace/bpf/, record source hashes"
	@echo "generate  regenerate ktrace/events/generated.py from the objects' BTF"
	@echo "proto     regenerate ktrace/cri/cri_pb2.py from ktrace/cri/cri.proto (grpcio-tools)"
	@echo "vmlinux   regenerate $(VMLINUX) from /sys/kernel/btf/vmlinux"
	@echo "test      run every test (kernel tests need root)"
	@echo "bench     overhead benchmark: TCP churn and UDP round trips alone, under ktrace, under tcpstates"
	@echo "bench-paced  the TCP churn under ktrace at fixed offered rates: the highest one with zero loss"
	@echo "lint      ruff"

# Run-time needs: libbpf.so.1 (ctypes). Tests also need iproute2 and nftables (namespaces, dropped SYNs),
# setpriv (dropped capabilities), and containerd, runc, umoci, busybox-static and the CNI plugins (real pods
# from an image built offline, with the node's network or their own). The BPF objects and the CRI bindings are
# prebuilt: no compiler is needed.
setup:
	@if ! ldconfig -p | grep -q 'libbpf.so.1 ' || ! command -v nft >/dev/null || ! command -v ip >/dev/null \
		|| ! command -v setpriv >/dev/null || ! command -v containerd >/dev/null || ! command -v runc >/dev/null \
		|| ! command -v umoci >/dev/null || ! dpkg -s busybox-static >/dev/null 2>&1 \
		|| ! test -x /usr/lib/cni/host-device || ! command -v nginx >/dev/null || ! command -v ab >/dev/null \
		|| ! command -v unbound >/dev/null || ! command -v dnsmasq >/dev/null || ! command -v dig >/dev/null \
		|| ! command -v conntrack >/dev/null || ! command -v nstat >/dev/null || ! command -v bpftrace >/dev/null \
		|| ! command -v iperf3 >/dev/null || ! command -v curl >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			libbpf1 iproute2 nftables util-linux containerd runc umoci busybox-static \
			containernetworking-plugins $(TEST_SERVERS) >/dev/null; \
	fi
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'

# make bpf needs clang, llvm (llvm-strip) and libbpf-dev (the bpf/ helper headers).
bpf: $(BPF_OBJ)
	$(PYTHON) -m ktrace.build manifest

ktrace/bpf/%.bpf.o: bpf/%.bpf.c $(BPF_HDR) $(VMLINUX)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@.tmp
	$(LLVM_STRIP) -g $@.tmp
	mv $@.tmp $@

generate:
	$(PYTHON) -m ktrace.build generate

proto:
	$(PYTHON) -m grpc_tools.protoc -Iktrace/cri --python_out=ktrace/cri ktrace/cri/cri.proto

vmlinux:
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $(VMLINUX).tmp
	mv $(VMLINUX).tmp $(VMLINUX)

test: lint
	$(PYTHON) -m pytest tests -q -rs

test-unit:
	$(PYTHON) -m pytest tests/unit

# What the benchmark compares ktrace with, installed only when it is missing.
bench-deps:
	@if ! test -x $(TCPSTATES); then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			libbpf-tools >/dev/null; \
	fi

bench: bench-deps
	$(PYTHON) -m benchmarks.bench --mode tcp
	$(PYTHON) -m benchmarks.bench --mode udp --n 300000

bench-paced:
	$(PYTHON) -m benchmarks.bench --mode paced

lint:
	$(PYTHON) -m ruff check ktrace tests benchmarks

clean:
	rm -f ktrace/bpf/*.tmp
