/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tc.c - north-south load balancing at tc (clsact, direct action) on node devices.
 *
 * Ingress: a packet of a known flow follows its conntrack entry; a new flow to an external frontend (NodePort,
 * LoadBalancer IP, externalIP; a ClusterIP too with --external-cluster-ip) picks a backend and is recorded. A
 * node-local backend gets the packet DNATed and handed to the stack (routing delivers it to the pod); a backend on
 * another node also gets it masqueraded to the node address and redirected out directly (the stack would drop a
 * packet arriving with the node's own source address). Replies to masqueraded flows come back here and are sent to the client.
 * Egress: replies of node-local backends are shown as coming from the frontend.
 * No usable backend: a TCP reset or an ICMP port unreachable goes back to the client (kube-proxy's REJECT);
 * externalTrafficPolicy=Local without a local backend and sources outside loadBalancerSourceRanges are dropped.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/asm-generic/errno.h>
#include "kpr.h"

/* Separate BPF functions (not inlined) for the big branches: each keeps its own stack frame under 512 bytes. */

#define KPR_NSEC_PER_SEC 1000000000ULL
#define IP4_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
/* bpf_l4_csum_replace: the diff covers IPv6 addresses, so a CHECKSUM_COMPLETE skb->csum must not change (newer
 * kernels; older ones reject the flag up front, and rewrite6 then retries without it). */
#ifndef BPF_F_IPV6
#define BPF_F_IPV6 (1ULL << 7)
#endif
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6
#define TCP_FLAGS_OFF 13
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* tcp_flags: TCP's, or an SCTP packet's first chunk in TCP's terms (sctp_flags), so that conntrack treats both alike. */
struct flow4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u16 l4_off;
	__u16 l4_len; /* from the IP header: the L4 packet without any Ethernet padding */
};

struct flow6 {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u16 l4_off;
	__u16 l4_len;
};

/* SCTP's common header and a chunk's header (RFC 9260, 3.1 and 3.2): the kernel's own are not UAPI. */
struct sctp_common {
	__be16 source;
	__be16 dest;
	__be32 vtag;
	__u8 checksum[4]; /* CRC32c, least significant byte first */
};

struct sctp_chunk {
	__u8 type;
	__u8 flags;
	__be16 length;
};

#define SCTP_CHUNK_INIT 1
#define SCTP_CHUNK_INIT_ACK 2
#define SCTP_CHUNK_ABORT 6
#define SCTP_CHUNK_SHUTDOWN_COMPLETE 14

/* An SCTP packet's first chunk as TCP flags: INIT opens an association (SYN), INIT ACK answers it (SYN ACK), ABORT and
 * SHUTDOWN COMPLETE end it (RST); anything else belongs to one (ACK). */
static __always_inline __u8 sctp_flags(__u8 chunk_type)
{
	switch (chunk_type) {
	case SCTP_CHUNK_INIT:
		return TCP_SYN;
	case SCTP_CHUNK_INIT_ACK:
		return TCP_SYN | TCP_ACK;
	case SCTP_CHUNK_ABORT:
	case SCTP_CHUNK_SHUTDOWN_COMPLETE:
		return TCP_RST;
	default:
		return TCP_ACK;
	}
}

/* BCC 0.26 declares bpf_redirect_neigh with an outdated prototype; call the helper with the kernel's own. */
static long (*kpr_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

static __always_inline long redirect_neigh(__u32 ifindex)
{
	return kpr_redirect_neigh(ifindex, NULL, 0, 0); /* the kernel resolves the next hop's MAC */
}


static __always_inline void counter_inc(__u32 idx)
{
	__u64 *value = counters.lookup(&idx);

	if (value)
		*value += 1;
}

/* The ports (and TCP flags) of a TCP, UDP or SCTP header that is there whole: a translation rewrites its checksum,
 * so a header cut short is left to the stack (which drops it) rather than half-translated and tracked. */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, __u8 proto, __be16 *sport, __be16 *dport,
				    __u8 *tcp_flags)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (bpf_skb_load_bytes(skb, off, &tcp, sizeof(tcp)) || tcp.doff < 5)
			return -1;
		*sport = tcp.source;
		*dport = tcp.dest;
		*tcp_flags = ((__u8 *)&tcp)[TCP_FLAGS_OFF];
		return 0;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, off, &udp, sizeof(udp)))
			return -1;
		*sport = udp.source;
		*dport = udp.dest;
		*tcp_flags = 0;
		return 0;
	}
	if (proto == IPPROTO_SCTP) {
		struct {
			struct sctp_common common;
			struct sctp_chunk chunk; /* every SCTP packet carries at least one */
		} sctp;

		if (bpf_skb_load_bytes(skb, off, &sctp, sizeof(sctp)))
			return -1;
		*sport = sctp.common.source;
		*dport = sctp.common.dest;
		*tcp_flags = sctp_flags(sctp.chunk.type);
		return 0;
	}
	return -1;
}

static __always_inline int parse4(struct __sk_buff *skb, struct flow4 *f)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4)
		return -1;
	if (ip.ihl != 5 || (ip.frag_off & bpf_htons(0x3fff)))
		return -1; /* IP options and fragments are left to the stack */
	f->saddr = ip.saddr;
	f->daddr = ip.daddr;
	f->proto = ip.protocol;
	f->l4_off = ETH_HLEN + sizeof(struct iphdr);
	f->l4_len = bpf_ntohs(ip.tot_len) - sizeof(struct iphdr);
	return parse_l4(skb, f->l4_off, f->proto, &f->sport, &f->dport, &f->tcp_flags);
}

static __always_inline int parse6(struct __sk_buff *skb, struct flow6 *f)
{
	struct ipv6hdr ip;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 6)
		return -1;
	__builtin_memcpy(f->saddr, &ip.saddr, 16);
	__builtin_memcpy(f->daddr, &ip.daddr, 16);
	f->proto = ip.nexthdr; /* extension headers are left to the stack */
	f->l4_off = ETH_HLEN + sizeof(struct ipv6hdr);
	f->l4_len = bpf_ntohs(ip.payload_len);
	return parse_l4(skb, f->l4_off, f->proto, &f->sport, &f->dport, &f->tcp_flags);
}

static __always_inline __u32 l4_csum_off(__u8 proto, __u16 l4_off)
{
	return l4_off + (proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
}

static __always_inline __u64 l4_csum_flags(__u8 proto)
{
	/* a UDP checksum of 0 means "none" and must stay so */
	return proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* ---- SCTP's checksum ----
 * A CRC32c over the SCTP packet alone (no pseudo-header: address rewrites leave it alone). A CRC is linear, so a port
 * change is folded in without reading the packet: for the 4 changed bytes `word` (XOR, packet order) at the start of
 * a packet of len bytes, crc(new) = crc(old) ^ word x^(8 len) mod P (bit-reflected; zlib's crc32_combine does the
 * same). x^(8 len) is the product of two powers from crc32c_powers; kpr/datapath/crc32c.py mirrors all of it. */
#define CRC32C_POLY 0x82f63b78 /* Castagnoli, bit-reflected */

/* a(x) b(x) modulo the polynomial, bit-reflected (x^0 is the top bit). Kept a loop: unrolled at every rewrite it
 * would multiply the programs' size, and the verifier walks bounded loops. */
static __always_inline __u32 crc32c_multiply(__u32 a, __u32 b)
{
	__u32 product = 0;

#pragma clang loop unroll(disable)
	for (int i = 0; i < 32; i++) {
		if (a & (0x80000000U >> i))
			product ^= b;
		b = (b & 1) ? (b >> 1) ^ CRC32C_POLY : b >> 1;
	}
	return product;
}

/* word x^(8 len) mod P; 0 if the table is missing. */
static __always_inline __u32 crc32c_shifted(__u32 word, __u32 len)
{
	__u32 low = len & 0xff, high = KPR_CRC32C_POWERS / 2 + ((len >> 8) & 0xff);
	__u32 *low_power = crc32c_powers.lookup(&low), *high_power = crc32c_powers.lookup(&high);

	if (!low_power || !high_power)
		return 0;
	return crc32c_multiply(word, crc32c_multiply(*low_power, *high_power));
}

/* Fold a port change at the start of an SCTP packet of l4_len bytes into its CRC32c (stored least significant byte
 * first, RFC 4960 appendix B), keeping it exactly as right, or as wrong, as it was. */
static __always_inline int sctp_port_changed(struct __sk_buff *skb, __u16 l4_off, __u16 l4_len, bool dst,
					     __be16 old_port, __be16 new_port)
{
	__be16 changed = old_port ^ new_port;
	__u8 bytes[2], crc[4];
	__u32 delta, fix;

	if (l4_len < sizeof(struct sctp_common) + sizeof(struct sctp_chunk))
		return -1;
	__builtin_memcpy(bytes, &changed, sizeof(bytes));
	delta = (__u32)bytes[0] | (__u32)bytes[1] << 8; /* packet order, first byte lowest */
	fix = crc32c_shifted(dst ? delta << 16 : delta, l4_len);
	if (!fix) /* a port did change: only a missing table gives 0 */
		return -1;
	if (bpf_skb_load_bytes(skb, l4_off + offsetof(struct sctp_common, checksum), crc, sizeof(crc)))
		return -1;
	crc[0] ^= fix;
	crc[1] ^= fix >> 8;
	crc[2] ^= fix >> 16;
	crc[3] ^= fix >> 24;
	/* a CRC is no ones' complement sum: nothing else compensates, so a CHECKSUM_COMPLETE skb->csum is updated */
	if (bpf_skb_store_bytes(skb, l4_off + offsetof(struct sctp_common, checksum), crc, sizeof(crc),
				BPF_F_RECOMPUTE_CSUM))
		return -1;
	counter_inc(KPR_CNT_TC_SCTP_CRC);
	return 0;
}

/* Rewrite the source (dst = false) or destination address and port, fixing the L3 and L4 checksums. */
static __always_inline int rewrite4(struct __sk_buff *skb, struct flow4 *f, bool dst, __be32 addr, __be16 port)
{
	__be32 old_addr = dst ? f->daddr : f->saddr;
	__be16 old_port = dst ? f->dport : f->sport;
	__u32 addr_off = ETH_HLEN + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
	__u32 port_off = f->l4_off + (dst ? 2 : 0);
	__u32 csum_off = l4_csum_off(f->proto, f->l4_off);
	__u64 mangled = l4_csum_flags(f->proto);

	bool sctp = f->proto == IPPROTO_SCTP;

	if (old_addr != addr) {
		if ((!sctp &&
		     bpf_l4_csum_replace(skb, csum_off, old_addr, addr, BPF_F_PSEUDO_HDR | mangled | sizeof(addr))) ||
		    bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old_addr, addr, sizeof(addr)) ||
		    bpf_skb_store_bytes(skb, addr_off, &addr, sizeof(addr), 0))
			return -1;
	}
	if (old_port != port) {
		if ((sctp ? sctp_port_changed(skb, f->l4_off, f->l4_len, dst, old_port, port)
			  : bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | sizeof(port))) ||
		    bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), sctp ? BPF_F_RECOMPUTE_CSUM : 0))
			return -1;
	}
	if (dst) {
		f->daddr = addr;
		f->dport = port;
	} else {
		f->saddr = addr;
		f->sport = port;
	}
	return 0;
}

static __always_inline int rewrite6(struct __sk_buff *skb, struct flow6 *f, bool dst, const __be32 *addr, __be16 port)
{
	__be32 *old_addr = dst ? f->daddr : f->saddr;
	__be16 old_port = dst ? f->dport : f->sport;
	__u32 addr_off = ETH_HLEN + (dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
	__u32 port_off = f->l4_off + (dst ? 2 : 0);
	__u32 csum_off = l4_csum_off(f->proto, f->l4_off);
	__u64 mangled = l4_csum_flags(f->proto);
	__be32 from[4], to[4];
	__s64 diff;

	bool sctp = f->proto == IPPROTO_SCTP;

	__builtin_memcpy(from, old_addr, 16);
	__builtin_memcpy(to, addr, 16);
	diff = bpf_csum_diff(from, 16, to, 16, 0);
	if (diff < 0 ||
	    (!sctp && bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_IPV6 | mangled) &&
	     bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled)) ||
	    bpf_skb_store_bytes(skb, addr_off, to, 16, sctp ? BPF_F_RECOMPUTE_CSUM : 0))
		return -1;
	if (old_port != port) {
		if ((sctp ? sctp_port_changed(skb, f->l4_off, f->l4_len, dst, old_port, port)
			  : bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | sizeof(port))) ||
		    bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), sctp ? BPF_F_RECOMPUTE_CSUM : 0))
			return -1;
	}
	__builtin_memcpy(old_addr, to, 16);
	if (dst)
		f->dport = port;
	else
		f->sport = port;
	return 0;
}

/* After a FIB lookup: out of the device it found (the next hop's MAC from the lookup, or resolved by the kernel),
 * answered with "too big" as forwarding would (toobig_tail), or dropped and counted. */
static __always_inline int redirect_by_fib(struct __sk_buff *skb, struct bpf_fib_lookup *fib, int rc,
					   __u32 toobig_tail)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		__u32 mtu = 0;

		/* the lookup stops before its MTU check when the next hop's MAC is unknown: check here */
		if (bpf_check_mtu(skb, fib->ifindex, &mtu, 0, 0) != BPF_MTU_CHK_RET_FRAG_NEEDED)
			return redirect_neigh(fib->ifindex);
		rc = BPF_FIB_LKUP_RET_FRAG_NEEDED;
		fib->mtu_result = mtu;
	}
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		/* Too big for the device toward its destination: answered as forwarding would (a tail call, with the
		 * device's MTU in cb[0]); the caller already translated it, and the answer is translated back. */
		skb->cb[0] = fib->mtu_result;
		tc_tails.call(skb, toobig_tail);
	}
	counter_inc(KPR_CNT_TC_DROP_FIB);
	return TC_ACT_SHOT;
}

/* Send a rewritten packet straight out of the device that routes to its destination. */
static __always_inline int redirect4(struct __sk_buff *skb, const struct flow4 *f)
{
	struct bpf_fib_lookup p = {};
	int rc;

	p.family = AF_INET;
	p.l4_protocol = f->proto;
	p.sport = f->sport;
	p.dport = f->dport;
	/* tot_len stays 0: the kernel then checks the skb against the output device as forwarding does, which lets a
	 * GRO/TSO aggregate through (it is segmented on the way out); a tot_len is compared with the MTU as it is, so
	 * every aggregate of a bulk transfer would come back FRAG_NEEDED. */
	p.ipv4_src = f->saddr;
	p.ipv4_dst = f->daddr;
	p.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	rc = bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_OUTPUT);
	return redirect_by_fib(skb, &p, rc, KPR_TAIL_TOOBIG4);
}

static __always_inline int redirect6(struct __sk_buff *skb, const struct flow6 *f)
{
	struct bpf_fib_lookup p = {};
	int rc;

	p.family = AF_INET6;
	p.l4_protocol = f->proto;
	p.sport = f->sport;
	p.dport = f->dport;
	/* tot_len stays 0: the kernel then checks the skb against the output device as forwarding does, which lets a
	 * GRO/TSO aggregate through (it is segmented on the way out); a tot_len is compared with the MTU as it is, so
	 * every aggregate of a bulk transfer would come back FRAG_NEEDED. */
	__builtin_memcpy(p.ipv6_src, f->saddr, 16);
	__builtin_memcpy(p.ipv6_dst, f->daddr, 16);
	p.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	rc = bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_OUTPUT);
	return redirect_by_fib(skb, &p, rc, KPR_TAIL_TOOBIG6);
}

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

static __always_inline int swap_macs(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN], swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)))
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0);
}

/* The TCP header of a reset answering a segment (RFC 793: seq from its ACK, else ACK everything it carried).
 * l4_len is the whole TCP segment's length: header with options, then data. */
static __always_inline int reset_header(struct __sk_buff *skb, __u16 l4_off, __u32 l4_len, struct tcphdr *rst)
{
	struct tcphdr in;
	__u32 payload;

	if (bpf_skb_load_bytes(skb, l4_off, &in, sizeof(in)))
		return -1;
	payload = l4_len - in.doff * 4;
	__builtin_memset(rst, 0, sizeof(*rst));
	rst->source = in.dest;
	rst->dest = in.source;
	rst->doff = 5;
	rst->rst = 1;
	if (in.ack) {
		rst->seq = in.ack_seq;
	} else {
		rst->ack = 1;
		rst->ack_seq = bpf_htonl(bpf_ntohl(in.seq) + payload + in.syn + in.fin);
	}
	return 0;
}

struct pseudo4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

struct reply4_tcp {
	struct iphdr ip;
	struct tcphdr tcp;
};

struct reply4_icmp {
	struct iphdr ip;
	struct icmphdr icmp;
	struct iphdr orig;
	__u8 orig_l4[8];
};

static __always_inline void reply_ip4(struct iphdr *ip, __be32 saddr, __be32 daddr, __u8 proto, __u16 len)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 4;
	ip->ihl = 5;
	ip->ttl = 64;
	ip->protocol = proto;
	ip->tot_len = bpf_htons(len);
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
}

/* Turn the packet in hand into an ICMP error about it, from its destination back to its source (its IP header and
 * first 8 bytes of TCP/UDP quoted; `rest` is the 4 bytes after the checksum, e.g. the next-hop MTU). */
static __always_inline int icmp4_reply(struct __sk_buff *skb, const struct flow4 *f, __u8 type, __u8 code, __be32 rest)
{
	struct reply4_icmp r;
	__s64 sum;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &r.orig, sizeof(r.orig)) ||
	    bpf_skb_load_bytes(skb, f->l4_off, r.orig_l4, sizeof(r.orig_l4)))
		return -1;
	reply_ip4(&r.ip, f->daddr, f->saddr, IPPROTO_ICMP, sizeof(r));
	__builtin_memset(&r.icmp, 0, sizeof(r.icmp));
	r.icmp.type = type;
	r.icmp.code = code;
	r.icmp.un.gateway = rest;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.icmp, sizeof(r) - sizeof(r.ip), 0);
	r.icmp.checksum = csum_fold(sum);
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) || swap_macs(skb) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return -1;
	return 0;
}

/* kube-proxy's REJECT for a frontend without backends: a reset for TCP, port unreachable for UDP, sent back out. */
static __always_inline int reject4(struct __sk_buff *skb, const struct flow4 *f)
{
	__u32 ifindex = skb->ifindex;

	if (f->proto == IPPROTO_TCP) {
		struct reply4_tcp r;
		struct pseudo4 ph = {};
		struct iphdr in;
		__s64 sum;

		if (f->tcp_flags & TCP_RST)
			return TC_ACT_SHOT; /* never answer a reset */
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &in, sizeof(in)))
			return TC_ACT_SHOT;
		if (reset_header(skb, f->l4_off, bpf_ntohs(in.tot_len) - sizeof(struct iphdr), &r.tcp))
			return TC_ACT_SHOT;
		reply_ip4(&r.ip, f->daddr, f->saddr, IPPROTO_TCP, sizeof(r));
		ph.saddr = f->daddr;
		ph.daddr = f->saddr;
		ph.proto = IPPROTO_TCP;
		ph.len = bpf_htons(sizeof(struct tcphdr));
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.tcp, sizeof(r.tcp), sum);
		r.tcp.check = csum_fold(sum);
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) || swap_macs(skb) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
			return TC_ACT_SHOT;
		counter_inc(KPR_CNT_TC_REJECT_TCP);
		return bpf_redirect(ifindex, 0);
	}

	if (icmp4_reply(skb, f, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_REJECT_UDP);
	return bpf_redirect(ifindex, 0);
}

struct pseudo6 {
	__be32 saddr[4];
	__be32 daddr[4];
	__be32 len;
	__u8 zero[3];
	__u8 nexthdr;
};

struct reply6_tcp {
	struct ipv6hdr ip;
	struct tcphdr tcp;
};

struct reply6_icmp {
	struct ipv6hdr ip;
	struct icmp6hdr icmp;
	struct ipv6hdr orig;
	__u8 orig_l4[8];
};

static __always_inline void reply_ip6(struct ipv6hdr *ip, const __be32 *saddr, const __be32 *daddr, __u8 nexthdr,
				      __u16 payload)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 6;
	ip->nexthdr = nexthdr;
	ip->hop_limit = 64;
	ip->payload_len = bpf_htons(payload);
	__builtin_memcpy(&ip->saddr, saddr, 16);
	__builtin_memcpy(&ip->daddr, daddr, 16);
}

static __always_inline __s64 pseudo6_sum(const __be32 *saddr, const __be32 *daddr, __u8 nexthdr, __u32 len)
{
	struct pseudo6 ph = {};

	__builtin_memcpy(ph.saddr, saddr, 16);
	__builtin_memcpy(ph.daddr, daddr, 16);
	ph.len = bpf_htonl(len);
	ph.nexthdr = nexthdr;
	return bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
}

static __always_inline int icmp6_reply(struct __sk_buff *skb, const struct flow6 *f, __u8 type, __u8 code, __be32 rest)
{
	struct reply6_icmp r;
	__s64 sum;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &r.orig, sizeof(r.orig)) ||
	    bpf_skb_load_bytes(skb, f->l4_off, r.orig_l4, sizeof(r.orig_l4)))
		return -1;
	reply_ip6(&r.ip, f->daddr, f->saddr, IPPROTO_ICMPV6, sizeof(r) - sizeof(r.ip));
	__builtin_memset(&r.icmp, 0, sizeof(r.icmp));
	r.icmp.icmp6_type = type;
	r.icmp.icmp6_code = code;
	r.icmp.icmp6_dataun.un_data32[0] = rest;
	sum = pseudo6_sum(f->daddr, f->saddr, IPPROTO_ICMPV6, sizeof(r) - sizeof(r.ip));
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.icmp, sizeof(r) - sizeof(r.ip), sum);
	r.icmp.icmp6_cksum = csum_fold(sum);
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) || swap_macs(skb) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
		return -1;
	return 0;
}

static __always_inline int reject6(struct __sk_buff *skb, const struct flow6 *f)
{
	__u32 ifindex = skb->ifindex;

	if (f->proto == IPPROTO_TCP) {
		struct reply6_tcp r;
		struct ipv6hdr in;
		__s64 sum;

		if (f->tcp_flags & TCP_RST)
			return TC_ACT_SHOT;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &in, sizeof(in)))
			return TC_ACT_SHOT;
		if (reset_header(skb, f->l4_off, bpf_ntohs(in.payload_len), &r.tcp))
			return TC_ACT_SHOT;
		reply_ip6(&r.ip, f->daddr, f->saddr, IPPROTO_TCP, sizeof(r.tcp));
		sum = pseudo6_sum(f->daddr, f->saddr, IPPROTO_TCP, sizeof(r.tcp));
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&r.tcp, sizeof(r.tcp), sum);
		r.tcp.check = csum_fold(sum);
		if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) || swap_macs(skb) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0))
			return TC_ACT_SHOT;
		counter_inc(KPR_CNT_TC_REJECT_TCP);
		return bpf_redirect(ifindex, 0);
	}

	if (icmp6_reply(skb, f, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_REJECT_UDP);
	return bpf_redirect(ifindex, 0);
}

/* ---- conntrack helpers ---- */

static __always_inline bool ct_expired(__u64 last_seen, __u8 flags, __u8 proto, __u64 now)
{
	__u64 lifetime = proto == IPPROTO_TCP	 ? KPR_CT_TCP_LIFETIME_S
			 : proto == IPPROTO_SCTP ? KPR_CT_SCTP_LIFETIME_S
						 : KPR_CT_UDP_LIFETIME_S;

	if (flags & KPR_CT_F_CLOSING)
		lifetime = KPR_CT_CLOSING_LIFETIME_S;
	/* another CPU may have refreshed last_seen after `now` was taken: that is not expiry */
	return now > last_seen && now - last_seen > lifetime * KPR_NSEC_PER_SEC;
}

static __always_inline __u8 ct_flags_after(__u8 flags, __u8 tcp_flags)
{
	return (tcp_flags & (TCP_FIN | TCP_RST)) ? flags | KPR_CT_F_CLOSING : flags;
}

/* A TCP segment that opens a connection (SYN without ACK), or an SCTP INIT. */
static __always_inline bool tcp_opens(__u8 proto, __u8 tcp_flags)
{
	return (proto == IPPROTO_TCP || proto == IPPROTO_SCTP) && (tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* Whether a tracked flow keeps its backend. kube-proxy deletes only UDP conntrack entries when their endpoint stops
 * serving: TCP (and SCTP) stays on its backend until it ends, whatever the backend's state (terminating, not ready,
 * gone from the slice); UDP while the backend serves. A new connection on an old tuple (a SYN or INIT after the flow
 * closed, or towards a backend that no longer serves) picks again, as conntrack does when a tuple is reused. */
static __always_inline bool ct_keeps_backend(__u8 backend_state, __u8 ct_flags, __u8 proto, __u8 tcp_flags)
{
	bool serving = backend_state <= KPR_BACKEND_TERMINATING;

	if (proto == IPPROTO_UDP)
		return serving;
	if (tcp_opens(proto, tcp_flags))
		return serving && !(ct_flags & KPR_CT_F_CLOSING);
	return true;
}

/* A backend for a new flow: the client's affine one, else a random slot. 0: none (inconsistent maps). */
static __always_inline __u32 affinity_pick(struct affinity_key *akey, const struct svc_value *svc, __u64 now)
{
	struct affinity_value *seen = affinity.lookup(akey);
	struct affinity_match_key match = {};

	if (!seen || now - seen->last_used_ns > (__u64)svc->affinity_timeout * KPR_NSEC_PER_SEC)
		return 0;
	match.backend_id = seen->backend_id;
	match.rev_nat_id = akey->rev_nat_id;
	return affinity_match.lookup(&match) ? seen->backend_id : 0;
}

static __always_inline void affinity_remember(struct affinity_key *akey, __u32 backend_id, __u64 now)
{
	struct affinity_value value = {};

	value.last_used_ns = now;
	value.backend_id = backend_id;
	affinity.update(akey, &value);
}

/* ---- IPv4 ---- */

static __always_inline __u32 svc4_backend(struct svc_key4 *key, const struct svc_value *svc, __be32 client, __u64 now)
{
	struct affinity_key akey = {};
	struct svc_value *slot;
	__u32 backend_id = 0;
	__u16 slots = svc->count;

	if (svc->flags & KPR_SVC_F_AFFINITY) {
		akey.client[0] = client;
		akey.rev_nat_id = svc->rev_nat_id;
		akey.kind = KPR_AFFINITY_ADDR;
		backend_id = affinity_pick(&akey, svc, now);
		counter_inc(backend_id ? KPR_CNT_AFFINITY_HIT : KPR_CNT_AFFINITY_NEW);
	}
	if (!backend_id && slots) {
		key->slot = (bpf_get_prandom_u32() % slots) + 1;
		slot = services4.lookup(key);
		if (!slot) {
			counter_inc(KPR_CNT_ERR_SLOT_MISSING);
			return 0;
		}
		backend_id = slot->backend_id;
	}
	if (backend_id && (svc->flags & KPR_SVC_F_AFFINITY))
		affinity_remember(&akey, backend_id, now);
	return backend_id;
}

static __always_inline struct kpr_config *datapath_config(void)
{
	__u32 zero = 0;

	return config.lookup(&zero);
}

static __always_inline bool serves_external_cluster_ip(void)
{
	struct kpr_config *cfg = datapath_config();

	return cfg && (cfg->flags & KPR_CONFIG_F_EXTERNAL_CLUSTER_IP);
}

/* Whether a source is one of the cluster's pods: kube-proxy's detect-local, ClusterCIDR mode (--cluster-cidr). */
static __always_inline bool pod_source4(__be32 saddr)
{
	struct kpr_config *cfg = datapath_config();
	__u8 prefix;

	if (!cfg)
		return false;
	prefix = cfg->cluster_prefix4;
	if (!prefix || prefix > 32)
		return false;
	return (saddr & bpf_htonl(~0U << (32 - prefix))) == cfg->cluster_cidr4;
}

static __always_inline bool pod_source6(const __be32 *saddr)
{
	struct kpr_config *cfg = datapath_config();
	__u8 prefix;

	if (!cfg)
		return false;
	prefix = cfg->cluster_prefix6;
	if (!prefix || prefix > 128)
		return false;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 bits = prefix > 32 * i ? prefix - 32 * i : 0;
		__be32 mask = bits >= 32 ? ~0U : (bits ? bpf_htonl(~0U << (32 - bits)) : 0);

		if ((saddr[i] & mask) != cfg->cluster_cidr6[i])
			return false;
	}
	return true;
}

static __always_inline bool src4_allowed(__u32 rev_nat_id, __be32 saddr)
{
	struct src_range_key4 key = {};

	key.prefixlen = 64;
	key.rev_nat_id = bpf_htonl(rev_nat_id);
	key.addr = saddr;
	return src_ranges4.lookup(&key) != NULL;
}

/* Pick a free masquerade port by inserting the reply entry; 0 when every try collided. */
static __always_inline int snat4_port(struct ct_key4 *reply, struct ct_value4 *value, __u64 now)
{
	__u32 span = KPR_SNAT_PORT_MAX - KPR_SNAT_PORT_MIN + 1;
	struct ct_value4 *taken;
	long rc;

#pragma unroll
	for (int i = 0; i < KPR_SNAT_TRIES; i++) {
		reply->dport = bpf_htons(KPR_SNAT_PORT_MIN + bpf_get_prandom_u32() % span);
		rc = ct4.insert(reply, value);
		if (rc == 0)
			return 0;
		if (rc == -E2BIG)
			return -E2BIG; /* conntrack is full, not the port range */
		/* A port whose flow has expired is free again, before the agent's collection of expired flows. */
		taken = ct4.lookup(reply);
		if (taken && ct_expired(taken->last_seen_ns, taken->flags, reply->proto, now) &&
		    ct4.update(reply, value) == 0)
			return 0;
	}
	return -EADDRINUSE;
}

/* A new flow to an external frontend: choose, record, translate. */
static __always_inline int new_flow4(struct __sk_buff *skb, struct flow4 *f, __u64 now, bool from_pod)
{
	struct svc_key4 key = {};
	struct svc_value *svc;
	struct backend4 *backend;
	struct ct_key4 okey = {}, rkey = {};
	struct ct_value4 oval = {}, rval = {};
	struct device_info *dev;
	__u32 backend_id;
	int rc;

	key.addr = f->daddr;
	key.port = f->dport;
	key.proto = f->proto;
	svc = services4.lookup(&key);
	if (!svc) {
		/* A NodePort, on one of the node addresses NodePorts answer on: the wildcard frontend. */
		if (!nodeport_addrs4.lookup(&f->daddr))
			return TC_ACT_OK; /* not ours: the stack decides */
		key.addr = 0;
		svc = services4.lookup(&key);
		if (!svc)
			return TC_ACT_OK;
	}
	/* A chained pod is an in-cluster client: any frontend. From a node device, a ClusterIP only with
	 * --external-cluster-ip (kube-proxy DNATs it whatever the source). */
	if (!from_pod && !(svc->flags & KPR_SVC_F_EXTERNAL) && !serves_external_cluster_ip())
		return TC_ACT_OK; /* a ClusterIP from outside: left to routing */
	/* kube-proxy's loadBalancerSourceRanges firewall applies to every source, pods included. */
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !src4_allowed(svc->rev_nat_id, f->saddr)) {
		counter_inc(KPR_CNT_TC_DROP_SOURCE_RANGE);
		return TC_ACT_SHOT;
	}
	/* Pods, chained ones here and (detect-local) those of other nodes, use the internal scope when there are two:
	 * kube-proxy sends "pod traffic for external destinations" to the cluster policy chain. */
	if ((svc->flags & KPR_SVC_F_TWO_SCOPES) && (from_pod || pod_source4(f->saddr))) {
		struct svc_value *internal;

		key.scope = KPR_SCOPE_INTERNAL;
		internal = services4.lookup(&key);
		if (internal) {
			svc = internal;
		} else {
			counter_inc(KPR_CNT_ERR_SCOPE_MISSING);
			key.scope = KPR_SCOPE_DEFAULT;
		}
	}
	if (!svc->count) {
		if (svc->flags & KPR_SVC_F_EMPTY_DROP) {
			counter_inc(KPR_CNT_TC_DROP_NO_LOCAL);
			return TC_ACT_SHOT;
		}
		tc_tails.call(skb, KPR_TAIL_REJECT4);
		return TC_ACT_SHOT;
	}
	if (f->proto == IPPROTO_TCP && !tcp_opens(f->proto, f->tcp_flags)) {
		/* A segment of no tracked flow (its backend is gone, or its entry was lost): the node has no such
		 * connection either, so end it with a reset instead of handing it on untranslated. */
		counter_inc(KPR_CNT_TC_RESET_UNTRACKED);
		tc_tails.call(skb, KPR_TAIL_REJECT4);
		return TC_ACT_SHOT;
	}
	backend_id = svc4_backend(&key, svc, f->saddr, now);
	backend = backend_id ? backends4.lookup(&backend_id) : NULL;
	if (!backend) {
		counter_inc(KPR_CNT_ERR_BACKEND_MISSING);
		tc_tails.call(skb, KPR_TAIL_REJECT4);
		return TC_ACT_SHOT;
	}

	okey.src = f->saddr;
	okey.dst = f->daddr;
	okey.sport = f->sport;
	okey.dport = f->dport;
	okey.proto = f->proto;
	okey.dir = KPR_CT_ORIGINAL;
	oval.last_seen_ns = now;
	oval.backend_id = backend_id;
	oval.rev_nat_id = svc->rev_nat_id;
	oval.flags = ct_flags_after(0, f->tcp_flags);
	oval.fe_addr = f->daddr; /* what the client dialled: its replies come from there */
	oval.fe_port = f->dport;

	rkey.src = backend->addr;
	rkey.sport = backend->port;
	rkey.proto = f->proto;
	rkey.dir = KPR_CT_REPLY;
	rval.last_seen_ns = now;
	rval.backend_id = backend_id;
	rval.rev_nat_id = svc->rev_nat_id;
	rval.fe_addr = f->daddr;
	rval.fe_port = f->dport;

	if (from_pod || (backend->flags & KPR_BACKEND_F_NODE_LOCAL)) {
		/* The backend answers the client directly (a pod's own address is routable in the cluster); egress toward
		 * the client shows the reply as coming from the frontend. */
		rkey.dst = f->saddr;
		rkey.dport = f->sport;
		if (ct4.update(&rkey, &rval)) {
			counter_inc(KPR_CNT_TC_DROP_CT_FULL);
			return TC_ACT_SHOT;
		}
	} else {
		/* Another node's pod: masquerade so the reply comes back through this node. */
		__u32 ifindex = skb->ifindex;

		dev = devices.lookup(&ifindex);
		if (!dev || !dev->addr4) {
			counter_inc(KPR_CNT_TC_DROP_FIB);
			return TC_ACT_SHOT;
		}
		rkey.dst = dev->addr4;
		rval.addr = f->saddr;
		rval.port = f->sport;
		rval.flags = KPR_CT_F_SNAT;
		rc = snat4_port(&rkey, &rval, now);
		if (rc) {
			counter_inc(rc == -E2BIG ? KPR_CNT_TC_DROP_CT_FULL : KPR_CNT_TC_DROP_SNAT_PORTS);
			return TC_ACT_SHOT;
		}
		oval.addr = dev->addr4;
		oval.port = rkey.dport;
		oval.flags |= KPR_CT_F_SNAT;
		counter_inc(KPR_CNT_TC_SNAT);
	}
	if (ct4.update(&okey, &oval)) {
		ct4.delete(&rkey);
		counter_inc(KPR_CNT_TC_DROP_CT_FULL);
		return TC_ACT_SHOT;
	}
	counter_inc(KPR_CNT_TC_CT_NEW);
	if (rewrite4(skb, f, true, backend->addr, backend->port))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_DNAT);
	if (oval.flags & KPR_CT_F_SNAT) {
		if (rewrite4(skb, f, false, oval.addr, oval.port))
			return TC_ACT_SHOT;
		return redirect4(skb, f);
	}
	return TC_ACT_OK;
}

/* ---- ICMP errors about tracked flows (conntrack's RELATED) ----
 *
 * An error quotes the IP header and first 8 bytes of the packet it is about, as that packet was where the error
 * arose. For a translated flow that is the wrong side of the translation: the sender cannot match it to anything it
 * sent. As netfilter does, the quoted packet is translated back (addresses, ports and their checksums) and the error
 * is sent on to the other end of the flow, from the address that end knows: Fragmentation Needed / Packet Too Big
 * (path MTU discovery), unreachables, time exceeded and parameter problems. Each direction is a tail call, entered
 * only for ICMP errors (the forwarding path's TCP/UDP parse fails for them first).
 */
#define ICMP4_CSUM_OFF (ETH_HLEN + sizeof(struct iphdr) + offsetof(struct icmphdr, checksum))
#define QUOTE4_OFF (ETH_HLEN + sizeof(struct iphdr) + sizeof(struct icmphdr))
#define ICMP6_CSUM_OFF (ETH_HLEN + sizeof(struct ipv6hdr) + offsetof(struct icmp6hdr, icmp6_cksum))
#define QUOTE6_OFF (ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr))

/* The quoted packet: its IP header and the 8 bytes of TCP or UDP header every ICMP error carries. */
struct quote4 {
	struct iphdr ip;
	__be16 sport;
	__be16 dport;
	__be16 udp_len;	  /* TCP: the sequence number's first half */
	__be16 udp_check; /* TCP: its second half (the TCP checksum is beyond the 8 bytes) */
};

struct quote6 {
	struct ipv6hdr ip;
	__be16 sport;
	__be16 dport;
	__be16 udp_len;
	__be16 udp_check;
};

/* Tail-call the ICMP error program `tail` when the packet is an ICMP error (IPv4 without options, not a fragment);
 * anything else, or a failed tail call, is left to the stack. */
static __always_inline int icmp4_error_tail(struct __sk_buff *skb, __u32 tail)
{
	struct iphdr ip;
	__u8 type;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl != 5 ||
	    ip.protocol != IPPROTO_ICMP || (ip.frag_off & bpf_htons(0x3fff)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), &type, 1))
		return TC_ACT_OK;
	if (type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB)
		tc_tails.call(skb, tail);
	return TC_ACT_OK;
}

static __always_inline int icmp6_error_tail(struct __sk_buff *skb, __u32 tail)
{
	struct ipv6hdr ip;
	__u8 type;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 6 || ip.nexthdr != IPPROTO_ICMPV6 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), &type, 1))
		return TC_ACT_OK;
	if (type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG || type == ICMPV6_TIME_EXCEED ||
	    type == ICMPV6_PARAMPROB)
		tc_tails.call(skb, tail);
	return TC_ACT_OK;
}

/* A quoted UDP checksum after its addresses and ports changed (0: none, stays so). */
static __always_inline __be16 quoted_udp_check(__be16 check, const __be32 *from, const __be32 *to, __u32 size)
{
	__u16 folded;

	if (!check)
		return 0;
	folded = csum_fold(bpf_csum_diff((__be32 *)from, size, (__be32 *)to, size, (__u16)~check));
	return folded ? folded : 0xffff;
}

/* Make an ICMP error about a translated packet read as one about the packet on the other side of the translation:
 * the quoted packet now goes from qsrc:qsport to qdst:qdport and the error from osrc to odst. Every checksum stays
 * right: the outer IP header's, the quoted IP header's, a quoted UDP checksum and the ICMP checksum. */
static __always_inline int icmp4_translate(struct __sk_buff *skb, const struct iphdr *outer, struct quote4 *q,
					   __be32 osrc, __be32 odst, __be32 qsrc, __be16 qsport, __be32 qdst,
					   __be16 qdport)
{
	struct quote4 old = *q;
	__be32 from[3], to[3];
	__s64 diff;

	q->ip.saddr = qsrc;
	q->ip.daddr = qdst;
	q->sport = qsport;
	q->dport = qdport;
	q->ip.check = 0;
	q->ip.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&q->ip, sizeof(q->ip), 0));
	if (q->ip.protocol == IPPROTO_UDP) {
		from[0] = old.ip.saddr;
		from[1] = old.ip.daddr;
		__builtin_memcpy(&from[2], &old.sport, 4);
		to[0] = qsrc;
		to[1] = qdst;
		__builtin_memcpy(&to[2], &q->sport, 4);
		q->udp_check = quoted_udp_check(old.udp_check, from, to, sizeof(from));
	}
	diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)q, sizeof(*q), 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, ICMP4_CSUM_OFF, 0, diff, 0) ||
	    bpf_skb_store_bytes(skb, QUOTE4_OFF, q, sizeof(*q), 0))
		return -1;
	if (osrc != outer->saddr &&
	    (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, outer->saddr, osrc, sizeof(osrc)) ||
	     bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), &osrc, sizeof(osrc), 0)))
		return -1;
	if (odst != outer->daddr &&
	    (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, outer->daddr, odst, sizeof(odst)) ||
	     bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, daddr), &odst, sizeof(odst), 0)))
		return -1;
	counter_inc(KPR_CNT_TC_ICMP_RELATED);
	return 0;
}

/* The same for IPv6: no header checksum, but the ICMPv6 checksum covers the outer addresses (pseudo-header). */
static __always_inline int icmp6_translate(struct __sk_buff *skb, const struct ipv6hdr *outer, struct quote6 *q,
					   const __be32 *osrc, const __be32 *odst, const __be32 *qsrc, __be16 qsport,
					   const __be32 *qdst, __be16 qdport)
{
	struct quote6 old = *q;
	__be32 from[9], to[9];
	__s64 diff;

	__builtin_memcpy(&q->ip.saddr, qsrc, 16);
	__builtin_memcpy(&q->ip.daddr, qdst, 16);
	q->sport = qsport;
	q->dport = qdport;
	if (q->ip.nexthdr == IPPROTO_UDP) {
		__builtin_memcpy(from, &old.ip.saddr, 32);
		__builtin_memcpy(&from[8], &old.sport, 4);
		__builtin_memcpy(to, &q->ip.saddr, 32);
		__builtin_memcpy(&to[8], &q->sport, 4);
		q->udp_check = quoted_udp_check(old.udp_check, from, to, sizeof(from));
	}
	diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)q, sizeof(*q), 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, 0, diff, 0) ||
	    bpf_skb_store_bytes(skb, QUOTE6_OFF, q, sizeof(*q), 0))
		return -1;
	__builtin_memcpy(from, &outer->saddr, 32);
	__builtin_memcpy(to, osrc, 16);
	__builtin_memcpy(&to[4], odst, 16);
	diff = bpf_csum_diff(from, 32, to, 32, 0);
	if (diff < 0 ||
	    (bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_IPV6) &&
	     bpf_l4_csum_replace(skb, ICMP6_CSUM_OFF, 0, diff, BPF_F_PSEUDO_HDR)) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), to, 32, 0))
		return -1;
	counter_inc(KPR_CNT_TC_ICMP_RELATED);
	return 0;
}

/* Arriving on a node device: an error about a packet this node sent on for a tracked flow. */
int kpr_tc_icmp4_in(struct __sk_buff *skb)
{
	struct iphdr outer;
	struct quote4 q;
	struct ct_key4 key = {};
	struct ct_value4 *ct;
	struct backend4 *backend;
	struct flow4 f = {};
	__u32 backend_id;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)) ||
	    bpf_skb_load_bytes(skb, QUOTE4_OFF, &q, sizeof(q)) || q.ip.version != 4 || q.ip.ihl != 5 ||
	    (q.ip.protocol != IPPROTO_TCP && q.ip.protocol != IPPROTO_UDP && q.ip.protocol != IPPROTO_SCTP))
		return TC_ACT_OK;
	/* The quoted packet, reversed, is the flow's key in the direction opposite to the quoted packet's. */
	key.src = q.ip.daddr;
	key.sport = q.dport;
	key.dst = q.ip.saddr;
	key.dport = q.sport;
	key.proto = q.ip.protocol;
	key.dir = KPR_CT_REPLY;
	ct = ct4.lookup(&key);
	if (ct && (ct->flags & KPR_CT_F_SNAT)) {
		/* About a packet masqueraded on to a backend of another node (node:port -> backend): the client hears of
		 * it as about what it sent (client -> frontend), from the frontend. */
		__be32 client = ct->addr, frontend = ct->fe_addr;
		__be16 client_port = ct->port, frontend_port = ct->fe_port;

		if (icmp4_translate(skb, &outer, &q, frontend, client, client, client_port, frontend, frontend_port))
			return TC_ACT_SHOT;
		f.saddr = frontend;
		f.daddr = client;
		f.proto = IPPROTO_ICMP;
		return redirect4(skb, &f);
	}
	key.dir = KPR_CT_ORIGINAL;
	ct = ct4.lookup(&key);
	if (!ct)
		return TC_ACT_OK;
	backend_id = ct->backend_id;
	backend = backends4.lookup(&backend_id);
	if (!backend)
		return TC_ACT_OK;
	if (ct->flags & KPR_CT_F_SNAT) {
		/* About a reply sent to the client for a backend of another node: that backend hears of it as about what
		 * it sent (backend -> node:port), from this node. */
		__be32 node = ct->addr;
		__be16 node_port = ct->port;

		if (icmp4_translate(skb, &outer, &q, node, backend->addr, backend->addr, backend->port, node, node_port))
			return TC_ACT_SHOT;
		f.saddr = node;
		f.daddr = backend->addr;
		f.proto = IPPROTO_ICMP;
		return redirect4(skb, &f);
	}
	/* About a reply of a backend on this node: it hears of it; the stack delivers it. */
	if (icmp4_translate(skb, &outer, &q, outer.saddr, backend->addr, backend->addr, backend->port, q.ip.daddr,
			    q.dport))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

int kpr_tc_icmp6_in(struct __sk_buff *skb)
{
	struct ipv6hdr outer;
	struct quote6 q;
	struct ct_key6 key = {};
	struct ct_value6 *ct;
	struct backend6 *backend;
	struct flow6 f = {};
	__u32 backend_id;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)) ||
	    bpf_skb_load_bytes(skb, QUOTE6_OFF, &q, sizeof(q)) || q.ip.version != 6 ||
	    (q.ip.nexthdr != IPPROTO_TCP && q.ip.nexthdr != IPPROTO_UDP && q.ip.nexthdr != IPPROTO_SCTP))
		return TC_ACT_OK;
	__builtin_memcpy(key.src, &q.ip.daddr, 16);
	key.sport = q.dport;
	__builtin_memcpy(key.dst, &q.ip.saddr, 16);
	key.dport = q.sport;
	key.proto = q.ip.nexthdr;
	key.dir = KPR_CT_REPLY;
	ct = ct6.lookup(&key);
	if (ct && (ct->flags & KPR_CT_F_SNAT)) {
		__be32 client[4], frontend[4];
		__be16 client_port = ct->port, frontend_port = ct->fe_port;

		__builtin_memcpy(client, ct->addr, 16);
		__builtin_memcpy(frontend, ct->fe_addr, 16);
		if (icmp6_translate(skb, &outer, &q, frontend, client, client, client_port, frontend, frontend_port))
			return TC_ACT_SHOT;
		__builtin_memcpy(f.saddr, frontend, 16);
		__builtin_memcpy(f.daddr, client, 16);
		f.proto = IPPROTO_ICMPV6;
		return redirect6(skb, &f);
	}
	key.dir = KPR_CT_ORIGINAL;
	ct = ct6.lookup(&key);
	if (!ct)
		return TC_ACT_OK;
	backend_id = ct->backend_id;
	backend = backends6.lookup(&backend_id);
	if (!backend)
		return TC_ACT_OK;
	if (ct->flags & KPR_CT_F_SNAT) {
		__be32 node[4], backend_addr[4];
		__be16 node_port = ct->port;

		__builtin_memcpy(node, ct->addr, 16);
		__builtin_memcpy(backend_addr, backend->addr, 16);
		if (icmp6_translate(skb, &outer, &q, node, backend_addr, backend_addr, backend->port, node, node_port))
			return TC_ACT_SHOT;
		__builtin_memcpy(f.saddr, node, 16);
		__builtin_memcpy(f.daddr, backend_addr, 16);
		f.proto = IPPROTO_ICMPV6;
		return redirect6(skb, &f);
	}
	{
		__be32 source[4], backend_addr[4], client[4];

		__builtin_memcpy(source, &outer.saddr, 16);
		__builtin_memcpy(backend_addr, backend->addr, 16);
		__builtin_memcpy(client, &q.ip.daddr, 16);
		if (icmp6_translate(skb, &outer, &q, source, backend_addr, backend_addr, backend->port, client, q.dport))
			return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

/* Leaving by a node device: an error about a packet this node handed to a backend here (from the backend, or from
 * this node forwarding it): the client hears of it as about what it sent, from the frontend. */
int kpr_tc_icmp4_out(struct __sk_buff *skb)
{
	struct iphdr outer;
	struct quote4 q;
	struct ct_key4 key = {};
	struct ct_value4 *ct;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)) ||
	    bpf_skb_load_bytes(skb, QUOTE4_OFF, &q, sizeof(q)) || q.ip.version != 4 || q.ip.ihl != 5 ||
	    (q.ip.protocol != IPPROTO_TCP && q.ip.protocol != IPPROTO_UDP && q.ip.protocol != IPPROTO_SCTP))
		return TC_ACT_OK;
	key.src = q.ip.daddr;
	key.sport = q.dport;
	key.dst = q.ip.saddr;
	key.dport = q.sport;
	key.proto = q.ip.protocol;
	key.dir = KPR_CT_REPLY;
	ct = ct4.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	if (icmp4_translate(skb, &outer, &q, ct->fe_addr, outer.daddr, q.ip.saddr, q.sport, ct->fe_addr, ct->fe_port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

int kpr_tc_icmp6_out(struct __sk_buff *skb)
{
	struct ipv6hdr outer;
	struct quote6 q;
	struct ct_key6 key = {};
	struct ct_value6 *ct;
	__be32 frontend[4], dest[4], client[4];
	__be16 frontend_port;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)) ||
	    bpf_skb_load_bytes(skb, QUOTE6_OFF, &q, sizeof(q)) || q.ip.version != 6 ||
	    (q.ip.nexthdr != IPPROTO_TCP && q.ip.nexthdr != IPPROTO_UDP && q.ip.nexthdr != IPPROTO_SCTP))
		return TC_ACT_OK;
	__builtin_memcpy(key.src, &q.ip.daddr, 16);
	key.sport = q.dport;
	__builtin_memcpy(key.dst, &q.ip.saddr, 16);
	key.dport = q.sport;
	key.proto = q.ip.nexthdr;
	key.dir = KPR_CT_REPLY;
	ct = ct6.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	__builtin_memcpy(frontend, ct->fe_addr, 16);
	frontend_port = ct->fe_port;
	__builtin_memcpy(dest, &outer.daddr, 16);
	__builtin_memcpy(client, &q.ip.saddr, 16);
	if (icmp6_translate(skb, &outer, &q, frontend, dest, client, q.sport, frontend, frontend_port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* A translated packet too big for the device toward its destination (redirect4/6 found it so; MTU in cb[0]): answered
 * as the kernel's forwarding would, with Fragmentation Needed (IPv4 with DF; without DF it is dropped, as kpr does not
 * fragment) or Packet Too Big, from this node to the packet's translated source; the ICMP error program then
 * translates that answer for the flow's other end (the client, or a backend) and sends it there. */
int kpr_tc_toobig4(struct __sk_buff *skb)
{
	struct flow4 f = {};
	struct iphdr ip;
	__u32 mtu = skb->cb[0];

	if (parse4(skb, &f) || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
		return TC_ACT_SHOT;
	if (!(ip.frag_off & bpf_htons(0x4000))) {
		counter_inc(KPR_CNT_TC_DROP_TOO_BIG);
		return TC_ACT_SHOT;
	}
	if (icmp4_reply(skb, &f, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, bpf_htonl(mtu)))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_TOO_BIG);
	tc_tails.call(skb, KPR_TAIL_ICMP4_IN);
	return TC_ACT_SHOT;
}

int kpr_tc_toobig6(struct __sk_buff *skb)
{
	struct flow6 f = {};
	__u32 mtu = skb->cb[0];

	if (parse6(skb, &f))
		return TC_ACT_SHOT;
	if (icmp6_reply(skb, &f, ICMPV6_PKT_TOOBIG, 0, bpf_htonl(mtu)))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_TOO_BIG);
	tc_tails.call(skb, KPR_TAIL_ICMP6_IN);
	return TC_ACT_SHOT;
}

static __always_inline int ingress4(struct __sk_buff *skb, bool from_pod)
{
	struct flow4 f = {};
	struct ct_key4 key = {};
	struct ct_value4 *ct;
	struct backend4 *backend;
	__u64 now = bpf_ktime_get_ns();

	if (parse4(skb, &f))
		return from_pod ? TC_ACT_OK : icmp4_error_tail(skb, KPR_TAIL_ICMP4_IN);
	key.src = f.saddr;
	key.dst = f.daddr;
	key.sport = f.sport;
	key.dport = f.dport;
	key.proto = f.proto;
	key.dir = KPR_CT_ORIGINAL;
	ct = ct4.lookup(&key);
	if (ct && !ct_expired(ct->last_seen_ns, ct->flags, f.proto, now)) {
		__u32 backend_id = ct->backend_id;

		backend = backends4.lookup(&backend_id);
		if (backend && ct_keeps_backend(backend->state, ct->flags, f.proto, f.tcp_flags)) {
			__be32 snat_addr = ct->addr;
			__be16 snat_port = ct->port;
			__u8 flags = ct_flags_after(ct->flags, f.tcp_flags);

			ct->last_seen_ns = now;
			ct->flags = flags;
			if (rewrite4(skb, &f, true, backend->addr, backend->port))
				return TC_ACT_SHOT;
			counter_inc(KPR_CNT_TC_DNAT);
			if (!(flags & KPR_CT_F_SNAT))
				return TC_ACT_OK;
			if (rewrite4(skb, &f, false, snat_addr, snat_port))
				return TC_ACT_SHOT;
			return redirect4(skb, &f);
		}
		counter_inc(KPR_CNT_TC_CT_STALE); /* its backend went away or stopped serving UDP: pick again below */
		ct4.delete(&key);
	}

	key.dir = KPR_CT_REPLY;
	ct = from_pod ? NULL : ct4.lookup(&key); /* masqueraded replies come back on node devices only */
	if (ct && (ct->flags & KPR_CT_F_SNAT)) {
		/* A masqueraded flow's reply: from the frontend the client dialled, to the client. */
		__be32 client = ct->addr, frontend = ct->fe_addr;
		__be16 client_port = ct->port, frontend_port = ct->fe_port;

		ct->last_seen_ns = now;
		ct->flags = ct_flags_after(ct->flags, f.tcp_flags);
		if (rewrite4(skb, &f, false, frontend, frontend_port) || rewrite4(skb, &f, true, client, client_port))
			return TC_ACT_SHOT;
		counter_inc(KPR_CNT_TC_REVNAT);
		return redirect4(skb, &f);
	}
	return new_flow4(skb, &f, now, from_pod);
}

static __always_inline int egress4(struct __sk_buff *skb)
{
	struct flow4 f = {};
	struct ct_key4 key = {};
	struct ct_value4 *ct;
	__be32 frontend;
	__be16 frontend_port;

	if (parse4(skb, &f))
		return icmp4_error_tail(skb, KPR_TAIL_ICMP4_OUT);
	key.src = f.saddr;
	key.dst = f.daddr;
	key.sport = f.sport;
	key.dport = f.dport;
	key.proto = f.proto;
	key.dir = KPR_CT_REPLY;
	ct = ct4.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	frontend = ct->fe_addr;
	frontend_port = ct->fe_port;
	ct->last_seen_ns = bpf_ktime_get_ns();
	ct->flags = ct_flags_after(ct->flags, f.tcp_flags);
	/* A node-local backend's reply leaves for the client: show the frontend it dialled as its source. */
	if (rewrite4(skb, &f, false, frontend, frontend_port))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_REVNAT);
	return TC_ACT_OK;
}

/* ---- IPv6 ---- */

static __always_inline __u32 svc6_backend(struct svc_key6 *key, const struct svc_value *svc, const __be32 *client,
					  __u64 now)
{
	struct affinity_key akey = {};
	struct svc_value *slot;
	__u32 backend_id = 0;
	__u16 slots = svc->count;

	if (svc->flags & KPR_SVC_F_AFFINITY) {
		__builtin_memcpy(akey.client, client, 16);
		akey.rev_nat_id = svc->rev_nat_id;
		akey.kind = KPR_AFFINITY_ADDR;
		backend_id = affinity_pick(&akey, svc, now);
		counter_inc(backend_id ? KPR_CNT_AFFINITY_HIT : KPR_CNT_AFFINITY_NEW);
	}
	if (!backend_id && slots) {
		key->slot = (bpf_get_prandom_u32() % slots) + 1;
		slot = services6.lookup(key);
		if (!slot) {
			counter_inc(KPR_CNT_ERR_SLOT_MISSING);
			return 0;
		}
		backend_id = slot->backend_id;
	}
	if (backend_id && (svc->flags & KPR_SVC_F_AFFINITY))
		affinity_remember(&akey, backend_id, now);
	return backend_id;
}

static __always_inline bool src6_allowed(__u32 rev_nat_id, const __be32 *saddr)
{
	struct src_range_key6 key = {};

	key.prefixlen = 160;
	key.rev_nat_id = bpf_htonl(rev_nat_id);
	__builtin_memcpy(key.addr, saddr, 16);
	return src_ranges6.lookup(&key) != NULL;
}

static __always_inline int snat6_port(struct ct_key6 *reply, struct ct_value6 *value, __u64 now)
{
	__u32 span = KPR_SNAT_PORT_MAX - KPR_SNAT_PORT_MIN + 1;
	struct ct_value6 *taken;
	long rc;

#pragma unroll
	for (int i = 0; i < KPR_SNAT_TRIES; i++) {
		reply->dport = bpf_htons(KPR_SNAT_PORT_MIN + bpf_get_prandom_u32() % span);
		rc = ct6.insert(reply, value);
		if (rc == 0)
			return 0;
		if (rc == -E2BIG)
			return -E2BIG; /* conntrack is full, not the port range */
		/* A port whose flow has expired is free again, before the agent's collection of expired flows. */
		taken = ct6.lookup(reply);
		if (taken && ct_expired(taken->last_seen_ns, taken->flags, reply->proto, now) &&
		    ct6.update(reply, value) == 0)
			return 0;
	}
	return -EADDRINUSE;
}

static __always_inline bool zero6(const __be32 *a)
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

static __always_inline int new_flow6(struct __sk_buff *skb, struct flow6 *f, __u64 now, bool from_pod)
{
	struct svc_key6 key = {};
	struct svc_value *svc;
	struct backend6 *backend;
	struct ct_key6 okey = {}, rkey = {};
	struct ct_value6 oval = {}, rval = {};
	struct device_info *dev;
	__u32 backend_id;
	int rc;

	__builtin_memcpy(key.addr, f->daddr, 16);
	key.port = f->dport;
	key.proto = f->proto;
	svc = services6.lookup(&key);
	if (!svc) {
		/* A NodePort, on one of the node addresses NodePorts answer on: the wildcard frontend. */
		if (!nodeport_addrs6.lookup((struct nodeport_addr6 *)f->daddr))
			return TC_ACT_OK; /* not ours: the stack decides */
		__builtin_memset(key.addr, 0, 16);
		svc = services6.lookup(&key);
		if (!svc)
			return TC_ACT_OK;
	}
	/* A chained pod is an in-cluster client: any frontend. From a node device, a ClusterIP only with
	 * --external-cluster-ip (kube-proxy DNATs it whatever the source). */
	if (!from_pod && !(svc->flags & KPR_SVC_F_EXTERNAL) && !serves_external_cluster_ip())
		return TC_ACT_OK; /* a ClusterIP from outside: left to routing */
	/* kube-proxy's loadBalancerSourceRanges firewall applies to every source, pods included. */
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !src6_allowed(svc->rev_nat_id, f->saddr)) {
		counter_inc(KPR_CNT_TC_DROP_SOURCE_RANGE);
		return TC_ACT_SHOT;
	}
	/* Pods, chained ones here and (detect-local) those of other nodes, use the internal scope when there are two:
	 * kube-proxy sends "pod traffic for external destinations" to the cluster policy chain. */
	if ((svc->flags & KPR_SVC_F_TWO_SCOPES) && (from_pod || pod_source6(f->saddr))) {
		struct svc_value *internal;

		key.scope = KPR_SCOPE_INTERNAL;
		internal = services6.lookup(&key);
		if (internal) {
			svc = internal;
		} else {
			counter_inc(KPR_CNT_ERR_SCOPE_MISSING);
			key.scope = KPR_SCOPE_DEFAULT;
		}
	}
	if (!svc->count) {
		if (svc->flags & KPR_SVC_F_EMPTY_DROP) {
			counter_inc(KPR_CNT_TC_DROP_NO_LOCAL);
			return TC_ACT_SHOT;
		}
		tc_tails.call(skb, KPR_TAIL_REJECT6);
		return TC_ACT_SHOT;
	}
	if (f->proto == IPPROTO_TCP && !tcp_opens(f->proto, f->tcp_flags)) {
		/* A segment of no tracked flow (its backend is gone, or its entry was lost): the node has no such
		 * connection either, so end it with a reset instead of handing it on untranslated. */
		counter_inc(KPR_CNT_TC_RESET_UNTRACKED);
		tc_tails.call(skb, KPR_TAIL_REJECT6);
		return TC_ACT_SHOT;
	}
	backend_id = svc6_backend(&key, svc, f->saddr, now);
	backend = backend_id ? backends6.lookup(&backend_id) : NULL;
	if (!backend) {
		counter_inc(KPR_CNT_ERR_BACKEND_MISSING);
		tc_tails.call(skb, KPR_TAIL_REJECT6);
		return TC_ACT_SHOT;
	}

	__builtin_memcpy(okey.src, f->saddr, 16);
	__builtin_memcpy(okey.dst, f->daddr, 16);
	okey.sport = f->sport;
	okey.dport = f->dport;
	okey.proto = f->proto;
	okey.dir = KPR_CT_ORIGINAL;
	oval.last_seen_ns = now;
	oval.backend_id = backend_id;
	oval.rev_nat_id = svc->rev_nat_id;
	oval.flags = ct_flags_after(0, f->tcp_flags);
	__builtin_memcpy(oval.fe_addr, f->daddr, 16); /* what the client dialled: its replies come from there */
	oval.fe_port = f->dport;

	__builtin_memcpy(rkey.src, backend->addr, 16);
	rkey.sport = backend->port;
	rkey.proto = f->proto;
	rkey.dir = KPR_CT_REPLY;
	rval.last_seen_ns = now;
	rval.backend_id = backend_id;
	rval.rev_nat_id = svc->rev_nat_id;
	__builtin_memcpy(rval.fe_addr, f->daddr, 16);
	rval.fe_port = f->dport;

	if (from_pod || (backend->flags & KPR_BACKEND_F_NODE_LOCAL)) {
		__builtin_memcpy(rkey.dst, f->saddr, 16);
		rkey.dport = f->sport;
		if (ct6.update(&rkey, &rval)) {
			counter_inc(KPR_CNT_TC_DROP_CT_FULL);
			return TC_ACT_SHOT;
		}
	} else {
		__u32 ifindex = skb->ifindex;

		dev = devices.lookup(&ifindex);
		if (!dev || zero6(dev->addr6)) {
			counter_inc(KPR_CNT_TC_DROP_FIB);
			return TC_ACT_SHOT;
		}
		__builtin_memcpy(rkey.dst, dev->addr6, 16);
		__builtin_memcpy(rval.addr, f->saddr, 16);
		rval.port = f->sport;
		rval.flags = KPR_CT_F_SNAT;
		rc = snat6_port(&rkey, &rval, now);
		if (rc) {
			counter_inc(rc == -E2BIG ? KPR_CNT_TC_DROP_CT_FULL : KPR_CNT_TC_DROP_SNAT_PORTS);
			return TC_ACT_SHOT;
		}
		__builtin_memcpy(oval.addr, dev->addr6, 16);
		oval.port = rkey.dport;
		oval.flags |= KPR_CT_F_SNAT;
		counter_inc(KPR_CNT_TC_SNAT);
	}
	if (ct6.update(&okey, &oval)) {
		ct6.delete(&rkey);
		counter_inc(KPR_CNT_TC_DROP_CT_FULL);
		return TC_ACT_SHOT;
	}
	counter_inc(KPR_CNT_TC_CT_NEW);
	if (rewrite6(skb, f, true, backend->addr, backend->port))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_DNAT);
	if (oval.flags & KPR_CT_F_SNAT) {
		if (rewrite6(skb, f, false, oval.addr, oval.port))
			return TC_ACT_SHOT;
		return redirect6(skb, f);
	}
	return TC_ACT_OK;
}

static __always_inline int ingress6(struct __sk_buff *skb, bool from_pod)
{
	struct flow6 f = {};
	struct ct_key6 key = {};
	struct ct_value6 *ct;
	struct backend6 *backend;
	__u64 now = bpf_ktime_get_ns();

	if (parse6(skb, &f))
		return from_pod ? TC_ACT_OK : icmp6_error_tail(skb, KPR_TAIL_ICMP6_IN);
	__builtin_memcpy(key.src, f.saddr, 16);
	__builtin_memcpy(key.dst, f.daddr, 16);
	key.sport = f.sport;
	key.dport = f.dport;
	key.proto = f.proto;
	key.dir = KPR_CT_ORIGINAL;
	ct = ct6.lookup(&key);
	if (ct && !ct_expired(ct->last_seen_ns, ct->flags, f.proto, now)) {
		__u32 backend_id = ct->backend_id;

		backend = backends6.lookup(&backend_id);
		if (backend && ct_keeps_backend(backend->state, ct->flags, f.proto, f.tcp_flags)) {
			__be32 snat_addr[4];
			__be16 snat_port = ct->port;
			__u8 flags = ct_flags_after(ct->flags, f.tcp_flags);

			__builtin_memcpy(snat_addr, ct->addr, 16);
			ct->last_seen_ns = now;
			ct->flags = flags;
			if (rewrite6(skb, &f, true, backend->addr, backend->port))
				return TC_ACT_SHOT;
			counter_inc(KPR_CNT_TC_DNAT);
			if (!(flags & KPR_CT_F_SNAT))
				return TC_ACT_OK;
			if (rewrite6(skb, &f, false, snat_addr, snat_port))
				return TC_ACT_SHOT;
			return redirect6(skb, &f);
		}
		counter_inc(KPR_CNT_TC_CT_STALE);
		ct6.delete(&key);
	}

	key.dir = KPR_CT_REPLY;
	ct = from_pod ? NULL : ct6.lookup(&key);
	if (ct && (ct->flags & KPR_CT_F_SNAT)) {
		__be32 client[4], frontend[4];
		__be16 client_port = ct->port, frontend_port = ct->fe_port;

		__builtin_memcpy(client, ct->addr, 16);
		__builtin_memcpy(frontend, ct->fe_addr, 16);
		ct->last_seen_ns = now;
		ct->flags = ct_flags_after(ct->flags, f.tcp_flags);
		if (rewrite6(skb, &f, false, frontend, frontend_port) || rewrite6(skb, &f, true, client, client_port))
			return TC_ACT_SHOT;
		counter_inc(KPR_CNT_TC_REVNAT);
		return redirect6(skb, &f);
	}
	return new_flow6(skb, &f, now, from_pod);
}

static __always_inline int egress6(struct __sk_buff *skb)
{
	struct flow6 f = {};
	struct ct_key6 key = {};
	struct ct_value6 *ct;
	__be32 frontend[4];
	__be16 frontend_port;

	if (parse6(skb, &f))
		return icmp6_error_tail(skb, KPR_TAIL_ICMP6_OUT);
	__builtin_memcpy(key.src, f.saddr, 16);
	__builtin_memcpy(key.dst, f.daddr, 16);
	key.sport = f.sport;
	key.dport = f.dport;
	key.proto = f.proto;
	key.dir = KPR_CT_REPLY;
	ct = ct6.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	__builtin_memcpy(frontend, ct->fe_addr, 16);
	frontend_port = ct->fe_port;
	ct->last_seen_ns = bpf_ktime_get_ns();
	ct->flags = ct_flags_after(ct->flags, f.tcp_flags);
	if (rewrite6(skb, &f, false, frontend, frontend_port))
		return TC_ACT_SHOT;
	counter_inc(KPR_CNT_TC_REVNAT);
	return TC_ACT_OK;
}

/* The programs, one per family and direction: the agent attaches each as a tc filter matching its protocol (ip or
 * ipv6), so each has a stack frame of its own. Names start with kpr_ so cleanup and status recognise them. */

int kpr_tc_in4(struct __sk_buff *skb)
{
	return ingress4(skb, false);
}

int kpr_tc_in6(struct __sk_buff *skb)
{
	return ingress6(skb, false);
}

/* CNI chaining: the ingress of a pod's host-side veth (traffic from the pod). Replies toward the pod use the egress
 * programs above. The agent pins these so kpr-cni attaches them without a compiler. */

int kpr_pod_in4(struct __sk_buff *skb)
{
	return ingress4(skb, true);
}

int kpr_pod_in6(struct __sk_buff *skb)
{
	return ingress6(skb, true);
}

int kpr_tc_out4(struct __sk_buff *skb)
{
	return egress4(skb);
}

int kpr_tc_out6(struct __sk_buff *skb)
{
	return egress6(skb);
}

/* Tail-call targets: answer the packet in hand with kube-proxy's REJECT. */

int kpr_tc_rej4(struct __sk_buff *skb)
{
	struct flow4 f = {};

	if (parse4(skb, &f))
		return TC_ACT_SHOT;
	return reject4(skb, &f);
}

int kpr_tc_rej6(struct __sk_buff *skb)
{
	struct flow6 f = {};

	if (parse6(skb, &f))
		return TC_ACT_SHOT;
	return reject6(skb, &f);
}
