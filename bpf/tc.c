/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tc.c - north-south load balancing at tc (clsact, direct action) on node devices and chained pods' veths.
 *
 * Ingress: a packet of a known flow follows its conntrack entry; a new flow to an external frontend (NodePort,
 * LoadBalancer IP, externalIP; a ClusterIP too with --external-cluster-ip; any frontend from a chained pod) picks a
 * backend with lb.h, the core sock.c shares, and is recorded. A node-local backend gets the packet DNATed and handed to
 * the stack (routing delivers it to the pod); a backend on another node also gets it masqueraded to the node address
 * and redirected out directly (the stack would drop a packet arriving with the node's own source address). Replies to
 * masqueraded flows come back here and are sent to the client.
 * Egress: replies of node-local backends are shown as coming from the frontend.
 * No usable backend: a TCP reset or an ICMP port unreachable goes back to the client (kube-proxy's REJECT);
 * externalTrafficPolicy=Local without a local backend and sources outside loadBalancerSourceRanges are dropped.
 *
 * Bottom up: packets (parse, rewrite with their checksums, send on), answers built in place of the packet (reject, too
 * big), conntrack, then per family a new flow's steps (select -> conntrack -> SNAT -> rewrite), ingress and egress, ICMP
 * errors about tracked flows, and the programs. Every helper is __always_inline (BCC 0.26 links no BPF-to-BPF calls);
 * what needs more stack than fits beside the forwarding path (building an answer, translating an ICMP error) runs as a
 * tail call, a program with a 512-byte stack of its own. Every TC_ACT_SHOT names its reason with drop(KPR_CNT_*).
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
#include "lb.h"

/* The map accesses lb.h declares (BCC rewrites map calls only in the file it compiles, not in lb.h). */
static __always_inline __u64 *lb_map_counter(__u32 *idx) { return counters.lookup(idx); }
static __always_inline struct kpr_config *lb_map_config(__u32 *zero) { return config.lookup(zero); }
static __always_inline struct svc_value *lb_map_service4(struct svc_key4 *key) { return services4.lookup(key); }
static __always_inline struct svc_value *lb_map_service6(struct svc_key6 *key) { return services6.lookup(key); }
static __always_inline __u8 *lb_map_nodeport4(__be32 *addr) { return nodeport_addrs4.lookup(addr); }
static __always_inline __u8 *lb_map_nodeport6(struct nodeport_addr6 *addr) { return nodeport_addrs6.lookup(addr); }
static __always_inline __u8 *lb_map_src_range4(struct src_range_key4 *key) { return src_ranges4.lookup(key); }
static __always_inline __u8 *lb_map_src_range6(struct src_range_key6 *key) { return src_ranges6.lookup(key); }
static __always_inline struct affinity_value *lb_map_affinity(struct affinity_key *key) { return affinity.lookup(key); }
static __always_inline void lb_map_affinity_set(struct affinity_key *key, struct affinity_value *value) { affinity.update(key, value); }
static __always_inline __u8 *lb_map_affinity_match(struct affinity_match_key *key) { return affinity_match.lookup(key); }
static __always_inline struct backend4 *lb_map_backend4(__u32 *id) { return backends4.lookup(id); }
static __always_inline struct backend6 *lb_map_backend6(__u32 *id) { return backends6.lookup(id); }

/* bpf_l4_csum_replace: the diff covers IPv6 addresses, so a CHECKSUM_COMPLETE skb->csum must not change (newer
 * kernels; older ones reject the flag up front, and rewrite6 then retries without it). */
#ifndef BPF_F_IPV6
#define BPF_F_IPV6 (1ULL << 7)
#endif

/* iphdr.frag_off (host order): don't fragment, more fragments, the fragment's offset. */
#ifndef IP_DF
#define IP_DF 0x4000
#endif
#ifndef IP_MF
#define IP_MF 0x2000
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1fff
#endif
#define IP4_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))

/* TCP, UDP and SCTP headers all start with the source port, then the destination port. */
#define L4_PORT_OFF(dst) ((dst) ? offsetof(struct udphdr, dest) : offsetof(struct udphdr, source))
#define TCP_CSUM_OFF offsetof(struct tcphdr, check)
#define UDP_CSUM_OFF offsetof(struct udphdr, check)
#define TCP_FLAGS_OFF (offsetof(struct tcphdr, window) - 1) /* the byte of FIN, SYN, RST, PSH, ACK, URG, ECE, CWR */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* What a step of a path returns when it decided nothing: the caller goes on (no TC_ACT_* has this value). */
#define TC_NEXT (-2)

/* What both families know of a packet past its IP header. tcp_flags: TCP's, or an SCTP packet's first chunk in TCP's
 * terms (sctp_flags), so that conntrack treats both alike. */
struct flow_l4 {
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u16 off;
	__u16 len; /* from the IP header: the L4 packet without any Ethernet padding */
};

struct flow4 {
	__be32 saddr;
	__be32 daddr;
	struct flow_l4 l4;
};

struct flow6 {
	__be32 saddr[4];
	__be32 daddr[4];
	struct flow_l4 l4;
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

/* The protocols the tc path translates and tracks. */
static __always_inline bool tracked_proto(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Drop the packet in hand, saying why in `kpr status`: every TC_ACT_SHOT goes through here. */
static __always_inline int drop(__u32 counter)
{
	counter_inc(counter);
	return TC_ACT_SHOT;
}

/* Go on in tail-call program `tail` (KPR_TAIL_*) where the packet must not go on untranslated: coming back means the
 * call failed (tc_tails has no such program; should never happen), and the packet is dropped. */
static __always_inline int tail_call_or_drop(struct __sk_buff *skb, __u32 tail)
{
	tc_tails.call(skb, tail);
	return drop(KPR_CNT_ERR_TAIL_CALL);
}

/* BCC 0.26 declares bpf_redirect_neigh with an outdated prototype; call the helper with the kernel's own. */
static long (*kpr_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

static __always_inline long redirect_neigh(__u32 ifindex)
{
	return kpr_redirect_neigh(ifindex, NULL, 0, 0); /* the kernel resolves the next hop's MAC */
}

/* ---- packets: parse ---- */

/* The ports (and TCP flags) of a TCP, UDP or SCTP header that is there whole: a translation rewrites its checksum,
 * so a header cut short is left to the stack (which drops it) rather than half-translated and tracked. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct flow_l4 *l4)
{
	if (l4->proto == IPPROTO_TCP) {
		struct tcphdr tcp;

		if (bpf_skb_load_bytes(skb, l4->off, &tcp, sizeof(tcp)) || tcp.doff < 5)
			return -1;
		l4->sport = tcp.source;
		l4->dport = tcp.dest;
		l4->tcp_flags = ((__u8 *)&tcp)[TCP_FLAGS_OFF];
		return 0;
	}
	if (l4->proto == IPPROTO_UDP) {
		struct udphdr udp;

		if (bpf_skb_load_bytes(skb, l4->off, &udp, sizeof(udp)))
			return -1;
		l4->sport = udp.source;
		l4->dport = udp.dest;
		l4->tcp_flags = 0;
		return 0;
	}
	if (l4->proto == IPPROTO_SCTP) {
		struct {
			struct sctp_common common;
			struct sctp_chunk chunk; /* every SCTP packet carries at least one */
		} sctp;

		if (bpf_skb_load_bytes(skb, l4->off, &sctp, sizeof(sctp)))
			return -1;
		l4->sport = sctp.common.source;
		l4->dport = sctp.common.dest;
		l4->tcp_flags = sctp_flags(sctp.chunk.type);
		return 0;
	}
	return -1;
}

static __always_inline int parse4(struct __sk_buff *skb, struct flow4 *f)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4)
		return -1;
	if (ip.ihl != 5 || (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return -1; /* IP options and fragments are left to the stack */
	f->saddr = ip.saddr;
	f->daddr = ip.daddr;
	f->l4.proto = ip.protocol;
	f->l4.off = ETH_HLEN + sizeof(struct iphdr);
	f->l4.len = bpf_ntohs(ip.tot_len) - sizeof(struct iphdr);
	return parse_l4(skb, &f->l4);
}

static __always_inline int parse6(struct __sk_buff *skb, struct flow6 *f)
{
	struct ipv6hdr ip;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 6)
		return -1;
	__builtin_memcpy(f->saddr, &ip.saddr, 16);
	__builtin_memcpy(f->daddr, &ip.daddr, 16);
	f->l4.proto = ip.nexthdr; /* extension headers are left to the stack */
	f->l4.off = ETH_HLEN + sizeof(struct ipv6hdr);
	f->l4.len = bpf_ntohs(ip.payload_len);
	return parse_l4(skb, &f->l4);
}

/* ---- packets: rewrite, checksums kept right ---- */

static __always_inline __u32 l4_csum_off(const struct flow_l4 *l4)
{
	return l4->off + (l4->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
}

static __always_inline __u64 l4_csum_flags(__u8 proto)
{
	/* a UDP checksum of 0 means "none" and must stay so */
	return proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* SCTP's checksum is a CRC32c over the SCTP packet alone (no pseudo-header: address rewrites leave it alone). A CRC is
 * linear, so a port change is folded in without reading the packet: for the 4 changed bytes `word` (XOR, packet order)
 * at the start of a packet of len bytes, crc(new) = crc(old) ^ word x^(8 len) mod P (bit-reflected; zlib's
 * crc32_combine does the same). x^(8 len) is the product of two powers from crc32c_powers; kpr/datapath/crc32c.py
 * mirrors all of it. */
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

/* Fold a port change at the start of an SCTP packet into its CRC32c (stored least significant byte first, RFC 4960
 * appendix B), keeping it exactly as right, or as wrong, as it was. */
static __always_inline int sctp_port_changed(struct __sk_buff *skb, const struct flow_l4 *l4, bool dst,
					     __be16 old_port, __be16 new_port)
{
	__u32 crc_off = l4->off + offsetof(struct sctp_common, checksum);
	__be16 changed = old_port ^ new_port;
	__u8 bytes[2], crc[4];
	__u32 delta, fix;

	if (l4->len < sizeof(struct sctp_common) + sizeof(struct sctp_chunk))
		return -1;
	__builtin_memcpy(bytes, &changed, sizeof(bytes));
	delta = (__u32)bytes[0] | (__u32)bytes[1] << 8; /* packet order, first byte lowest */
	fix = crc32c_shifted(dst ? delta << 16 : delta, l4->len);
	if (!fix) /* a port did change: only a missing table gives 0 */
		return -1;
	if (bpf_skb_load_bytes(skb, crc_off, crc, sizeof(crc)))
		return -1;
	crc[0] ^= fix;
	crc[1] ^= fix >> 8;
	crc[2] ^= fix >> 16;
	crc[3] ^= fix >> 24;
	/* a CRC is no ones' complement sum: nothing else compensates, so a CHECKSUM_COMPLETE skb->csum is updated */
	if (bpf_skb_store_bytes(skb, crc_off, crc, sizeof(crc), BPF_F_RECOMPUTE_CSUM))
		return -1;
	counter_inc(KPR_CNT_TC_SCTP_CRC);
	return 0;
}

/* Rewrite the source (dst = false) or destination port, fixing the L4 checksum (SCTP's CRC32c included). */
static __always_inline int rewrite_port(struct __sk_buff *skb, struct flow_l4 *l4, bool dst, __be16 port)
{
	__be16 old = dst ? l4->dport : l4->sport;
	bool sctp = l4->proto == IPPROTO_SCTP;

	if (old != port) {
		if ((sctp ? sctp_port_changed(skb, l4, dst, old, port)
			  : bpf_l4_csum_replace(skb, l4_csum_off(l4), old, port, l4_csum_flags(l4->proto) | sizeof(port))) ||
		    bpf_skb_store_bytes(skb, l4->off + L4_PORT_OFF(dst), &port, sizeof(port),
					sctp ? BPF_F_RECOMPUTE_CSUM : 0))
			return -1;
	}
	if (dst)
		l4->dport = port;
	else
		l4->sport = port;
	return 0;
}

/* Rewrite the source (dst = false) or destination address and port, fixing the L3 and L4 checksums. */
static __always_inline int rewrite4(struct __sk_buff *skb, struct flow4 *f, bool dst, __be32 addr, __be16 port)
{
	__be32 old = dst ? f->daddr : f->saddr;
	__u32 addr_off = ETH_HLEN + (dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr));
	bool sctp = f->l4.proto == IPPROTO_SCTP;

	if (old != addr) {
		if ((!sctp && bpf_l4_csum_replace(skb, l4_csum_off(&f->l4), old, addr,
						  BPF_F_PSEUDO_HDR | l4_csum_flags(f->l4.proto) | sizeof(addr))) ||
		    bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old, addr, sizeof(addr)) ||
		    bpf_skb_store_bytes(skb, addr_off, &addr, sizeof(addr), 0))
			return -1;
	}
	if (dst)
		f->daddr = addr;
	else
		f->saddr = addr;
	return rewrite_port(skb, &f->l4, dst, port);
}

static __always_inline int rewrite6(struct __sk_buff *skb, struct flow6 *f, bool dst, const __be32 *addr, __be16 port)
{
	__be32 *old = dst ? f->daddr : f->saddr;
	__u32 addr_off = ETH_HLEN + (dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr));
	__u32 csum_off = l4_csum_off(&f->l4);
	__u64 mangled = l4_csum_flags(f->l4.proto);
	bool sctp = f->l4.proto == IPPROTO_SCTP;
	__s64 diff = bpf_csum_diff(old, 16, (__be32 *)addr, 16, 0);

	if (diff < 0 ||
	    (!sctp && bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_IPV6 | mangled) &&
	     bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled)) ||
	    bpf_skb_store_bytes(skb, addr_off, (void *)addr, 16, sctp ? BPF_F_RECOMPUTE_CSUM : 0))
		return -1;
	__builtin_memcpy(old, addr, 16);
	return rewrite_port(skb, &f->l4, dst, port);
}

/* ---- packets: send on ---- */

/* Send a rewritten packet straight out of the device that routes to its destination (fib: its family and addresses):
 * with the next hop's MAC from the lookup, or resolved by the kernel; too big for that device, answered as forwarding
 * would (toobig_tail); anything else dropped and counted. */
static __always_inline int redirect_by_fib(struct __sk_buff *skb, struct bpf_fib_lookup *fib, const struct flow_l4 *l4,
					   __u32 toobig_tail)
{
	int rc;

	fib->l4_protocol = l4->proto;
	fib->sport = l4->sport;
	fib->dport = l4->dport;
	/* tot_len stays 0: the kernel then checks the skb against the output device as forwarding does, which lets a
	 * GRO/TSO aggregate through (it is segmented on the way out); a tot_len is compared with the MTU as it is, so
	 * every aggregate of a bulk transfer would come back FRAG_NEEDED. */
	fib->ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0))
			return drop(KPR_CNT_TC_DROP_REWRITE);
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
		return tail_call_or_drop(skb, toobig_tail);
	}
	return drop(KPR_CNT_TC_DROP_FIB);
}

static __always_inline int redirect4(struct __sk_buff *skb, __be32 saddr, __be32 daddr, const struct flow_l4 *l4)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET;
	fib.ipv4_src = saddr;
	fib.ipv4_dst = daddr;
	return redirect_by_fib(skb, &fib, l4, KPR_TAIL_TOOBIG4);
}

static __always_inline int redirect6(struct __sk_buff *skb, const __be32 *saddr, const __be32 *daddr,
				     const struct flow_l4 *l4)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET6;
	__builtin_memcpy(fib.ipv6_src, saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, daddr, 16);
	return redirect_by_fib(skb, &fib, l4, KPR_TAIL_TOOBIG6);
}

/* ---- answers built in place of the packet in hand (run as tail calls) ---- */

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

/* The packet in hand becomes `answer` (len bytes from the IP header on), to go back the way it came. */
static __always_inline int answer_in_place(struct __sk_buff *skb, void *answer, __u32 len)
{
	if (bpf_skb_change_tail(skb, ETH_HLEN + len, 0) || swap_macs(skb))
		return -1;
	return bpf_skb_store_bytes(skb, ETH_HLEN, answer, len, 0);
}

/* The TCP header of a reset answering a segment (RFC 793: seq from its ACK, else ACK everything it carried). */
static __always_inline int reset_header(struct __sk_buff *skb, const struct flow_l4 *l4, struct tcphdr *rst)
{
	struct tcphdr in;
	__u32 payload;

	if (bpf_skb_load_bytes(skb, l4->off, &in, sizeof(in)))
		return -1;
	payload = l4->len - in.doff * 4; /* the whole segment, less its header with options */
	__builtin_memset(rst, 0, sizeof(*rst));
	rst->source = in.dest;
	rst->dest = in.source;
	rst->doff = sizeof(*rst) / 4;
	rst->rst = 1;
	if (in.ack) {
		rst->seq = in.ack_seq;
	} else {
		rst->ack = 1;
		rst->ack_seq = bpf_htonl(bpf_ntohl(in.seq) + payload + in.syn + in.fin);
	}
	return 0;
}

/* kube-proxy's REJECT sent: counted as a reset or an unreachable, back out of the device the packet came in on. */
static __always_inline int rejected(struct __sk_buff *skb, const struct flow_l4 *l4)
{
	counter_inc(l4->proto == IPPROTO_TCP ? KPR_CNT_TC_REJECT_TCP : KPR_CNT_TC_REJECT_UDP);
	return bpf_redirect(skb->ifindex, 0);
}

struct pseudo4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

struct answer4_tcp {
	struct iphdr ip;
	struct tcphdr tcp;
};

struct answer4_icmp {
	struct iphdr ip;
	struct icmphdr icmp;
	struct iphdr orig;
	__u8 orig_l4[8];
};

static __always_inline void answer_ip4(struct iphdr *ip, __be32 saddr, __be32 daddr, __u8 proto, __u16 len)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 4;
	ip->ihl = sizeof(*ip) / 4;
	ip->ttl = 64;
	ip->protocol = proto;
	ip->tot_len = bpf_htons(len);
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
}

/* Turn the packet in hand into an ICMP error about it, from its destination back to its source (its IP header and
 * first 8 bytes of TCP/UDP quoted; `rest` is the 4 bytes after the checksum, e.g. the next-hop MTU). */
static __always_inline int icmp4_answer(struct __sk_buff *skb, const struct flow4 *f, __u8 type, __u8 code, __be32 rest)
{
	struct answer4_icmp a;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &a.orig, sizeof(a.orig)) ||
	    bpf_skb_load_bytes(skb, f->l4.off, a.orig_l4, sizeof(a.orig_l4)))
		return -1;
	answer_ip4(&a.ip, f->daddr, f->saddr, IPPROTO_ICMP, sizeof(a));
	__builtin_memset(&a.icmp, 0, sizeof(a.icmp));
	a.icmp.type = type;
	a.icmp.code = code;
	a.icmp.un.gateway = rest;
	a.icmp.checksum = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&a.icmp, sizeof(a) - sizeof(a.ip), 0));
	return answer_in_place(skb, &a, sizeof(a));
}

/* kube-proxy's REJECT for the packet in hand: a TCP reset, or ICMP port unreachable for UDP and SCTP. */
static __always_inline int reject4(struct __sk_buff *skb, const struct flow4 *f)
{
	struct answer4_tcp a;
	struct pseudo4 ph = {};
	__s64 sum;

	if (f->l4.proto != IPPROTO_TCP)
		return icmp4_answer(skb, f, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0);
	if (reset_header(skb, &f->l4, &a.tcp))
		return -1;
	answer_ip4(&a.ip, f->daddr, f->saddr, IPPROTO_TCP, sizeof(a));
	ph.saddr = f->daddr;
	ph.daddr = f->saddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(a.tcp));
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	a.tcp.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&a.tcp, sizeof(a.tcp), sum));
	return answer_in_place(skb, &a, sizeof(a));
}

struct pseudo6 {
	__be32 saddr[4];
	__be32 daddr[4];
	__be32 len;
	__u8 zero[3];
	__u8 nexthdr;
};

struct answer6_tcp {
	struct ipv6hdr ip;
	struct tcphdr tcp;
};

struct answer6_icmp {
	struct ipv6hdr ip;
	struct icmp6hdr icmp;
	struct ipv6hdr orig;
	__u8 orig_l4[8];
};

/* An IPv6 header from the packet in hand's destination back to its source, and the sum of its pseudo-header. */
static __always_inline __s64 answer_ip6(struct ipv6hdr *ip, const struct flow6 *f, __u8 nexthdr, __u16 payload)
{
	struct pseudo6 ph = {};

	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 6;
	ip->nexthdr = nexthdr;
	ip->hop_limit = 64;
	ip->payload_len = bpf_htons(payload);
	__builtin_memcpy(&ip->saddr, f->daddr, 16);
	__builtin_memcpy(&ip->daddr, f->saddr, 16);
	__builtin_memcpy(ph.saddr, f->daddr, 16);
	__builtin_memcpy(ph.daddr, f->saddr, 16);
	ph.len = bpf_htonl(payload);
	ph.nexthdr = nexthdr;
	return bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
}

static __always_inline int icmp6_answer(struct __sk_buff *skb, const struct flow6 *f, __u8 type, __u8 code, __be32 rest)
{
	struct answer6_icmp a;
	__s64 sum;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &a.orig, sizeof(a.orig)) ||
	    bpf_skb_load_bytes(skb, f->l4.off, a.orig_l4, sizeof(a.orig_l4)))
		return -1;
	sum = answer_ip6(&a.ip, f, IPPROTO_ICMPV6, sizeof(a) - sizeof(a.ip));
	__builtin_memset(&a.icmp, 0, sizeof(a.icmp));
	a.icmp.icmp6_type = type;
	a.icmp.icmp6_code = code;
	a.icmp.icmp6_dataun.un_data32[0] = rest;
	a.icmp.icmp6_cksum = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&a.icmp, sizeof(a) - sizeof(a.ip), sum));
	return answer_in_place(skb, &a, sizeof(a));
}

static __always_inline int reject6(struct __sk_buff *skb, const struct flow6 *f)
{
	struct answer6_tcp a;
	__s64 sum;

	if (f->l4.proto != IPPROTO_TCP)
		return icmp6_answer(skb, f, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0);
	if (reset_header(skb, &f->l4, &a.tcp))
		return -1;
	sum = answer_ip6(&a.ip, f, IPPROTO_TCP, sizeof(a.tcp));
	a.tcp.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&a.tcp, sizeof(a.tcp), sum));
	return answer_in_place(skb, &a, sizeof(a));
}

/* ---- conntrack ---- */

static __always_inline bool ct_expired(__u64 last_seen, __u8 flags, __u8 proto, __u64 now)
{
	__u64 lifetime = proto == IPPROTO_TCP	 ? KPR_CT_TCP_LIFETIME_S
			 : proto == IPPROTO_SCTP ? KPR_CT_SCTP_LIFETIME_S
						 : KPR_CT_UDP_LIFETIME_S;

	if (flags & KPR_CT_F_CLOSING)
		lifetime = KPR_CT_CLOSING_LIFETIME_S;
	/* another CPU may have refreshed last_seen after `now` was taken: that is not expiry */
	return now > last_seen && now - last_seen > lifetime * NSEC_PER_SEC;
}

static __always_inline __u8 ct_flags_after(__u8 flags, __u8 tcp_flags)
{
	return (tcp_flags & (TCP_FIN | TCP_RST)) ? flags | KPR_CT_F_CLOSING : flags;
}

/* A packet of a tracked flow keeps its entry alive (and marks it closing after a FIN or RST); the flags after it. */
static __always_inline __u8 ct_touch(__u64 *last_seen, __u8 *flags, __u64 now, __u8 tcp_flags)
{
	*last_seen = now;
	*flags = ct_flags_after(*flags, tcp_flags);
	return *flags;
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
static __always_inline bool ct_keeps_backend(__u8 backend_state, __u8 ct_flags, const struct flow_l4 *l4)
{
	bool serving = backend_state <= KPR_BACKEND_TERMINATING;

	if (l4->proto == IPPROTO_UDP)
		return serving;
	if (tcp_opens(l4->proto, l4->tcp_flags))
		return serving && !(ct_flags & KPR_CT_F_CLOSING);
	return true;
}

/* ---- a new flow, the family-independent parts ---- */

/* Which frontends the tc path serves: from a chained pod (an in-cluster client) any; from a node device the external
 * ones (NodePort, LoadBalancer, externalIPs), and ClusterIPs only with --external-cluster-ip (kube-proxy DNATs them
 * whatever the source; without it they are left to routing). */
static __always_inline bool tc_serves(const struct svc_value *svc, bool from_pod)
{
	struct kpr_config *cfg;

	if (from_pod || (svc->flags & KPR_SVC_F_EXTERNAL))
		return true;
	cfg = lb_config();
	return cfg && (cfg->flags & KPR_CONFIG_F_EXTERNAL_CLUSTER_IP);
}

/* kube-proxy's REJECT, answered by the tail call `tail` (kpr_tc_rej4/6); a TCP reset is never answered. */
static __always_inline int reject(struct __sk_buff *skb, const struct flow_l4 *l4, __u32 tail)
{
	if (l4->proto == IPPROTO_TCP && (l4->tcp_flags & TCP_RST))
		return drop(KPR_CNT_TC_DROP_RESET);
	return tail_call_or_drop(skb, tail);
}

/* Whether the frontend entry svc (in the client's scope) takes a new flow (TC_NEXT), else what becomes of it: without a
 * backend, a drop when the service has some on other nodes only (Local policy), else kube-proxy's REJECT. A TCP segment
 * other than a SYN belongs to no tracked flow (its backend is gone, or its entry was lost) and the node has no such
 * connection either: it is ended with a reset instead of handed on untranslated. */
static __always_inline int tc_admit(struct __sk_buff *skb, const struct svc_value *svc, const struct flow_l4 *l4,
				    __u32 reject_tail)
{
	if (!svc->count) {
		if (svc->flags & KPR_SVC_F_EMPTY_DROP)
			return drop(KPR_CNT_TC_DROP_NO_LOCAL);
		return reject(skb, l4, reject_tail);
	}
	if (l4->proto == IPPROTO_TCP && !tcp_opens(l4->proto, l4->tcp_flags)) {
		counter_inc(KPR_CNT_TC_RESET_UNTRACKED);
		return reject(skb, l4, reject_tail);
	}
	return TC_NEXT;
}

/* Whether a source is one of the cluster's pods: kube-proxy's detect-local, ClusterCIDR mode (--cluster-cidr). */
static __always_inline bool pod_source4(__be32 saddr)
{
	struct kpr_config *cfg = lb_config();
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
	struct kpr_config *cfg = lb_config();
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

/* ---- IPv4 flows ---- */

static __always_inline void ct4_key(struct ct_key4 *key, const struct flow4 *f, __u8 dir)
{
	key->src = f->saddr;
	key->dst = f->daddr;
	key->sport = f->l4.sport;
	key->dport = f->l4.dport;
	key->proto = f->l4.proto;
	key->dir = dir;
}

/* What the select step chose for a new flow: a backend, for the frontend entry rev_nat_id names. */
struct choice4 {
	struct backend4 *backend;
	__u32 backend_id;
	__u32 rev_nat_id;
};

/* What the rewrite step needs of a flow's ORIGINAL entry: whether it is masqueraded (flags), and to what. */
struct snat4 {
	__be32 addr;
	__be16 port;
	__u8 flags;
};

/* A new flow's two conntrack entries. ORIGINAL, keyed by what the client sent, names the backend and, when masqueraded,
 * the node address:port used; REPLY, keyed by what the backend sends back, the client to restore when masqueraded. */
struct ct4_pair {
	struct ct_key4 okey;
	struct ct_key4 rkey;
	struct ct_value4 oval;
	struct ct_value4 rval;
};

/* Select: the backend a new flow goes to (TC_NEXT, *choice), else the flow's verdict. Each step's keys live only as
 * long as the step: the tail of the path (conntrack, rewrite, FIB lookup) needs the stack. */
static __always_inline int select4(struct __sk_buff *skb, const struct flow4 *f, bool from_pod, struct choice4 *choice)
{
	struct svc_key4 key = {};
	struct affinity_key akey = {};
	struct svc_value *svc;
	int verdict;

	key.addr = f->daddr;
	key.port = f->l4.dport;
	key.proto = f->l4.proto;
	svc = lb4_lookup_frontend(&key, false);
	if (!svc || !tc_serves(svc, from_pod))
		return TC_ACT_OK; /* not ours: the stack decides */
	/* kube-proxy's loadBalancerSourceRanges firewall applies to every source, pods included. */
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !lb4_src_allowed(svc->rev_nat_id, f->saddr))
		return drop(KPR_CNT_TC_DROP_SOURCE_RANGE);
	/* Pods, chained ones here and (detect-local) those of other nodes, use the internal scope when there are two:
	 * kube-proxy sends "pod traffic for external destinations" to the cluster policy chain. */
	svc = lb4_select_scope(&key, svc, from_pod || pod_source4(f->saddr));
	verdict = tc_admit(skb, svc, &f->l4, KPR_TAIL_REJECT4);
	if (verdict != TC_NEXT)
		return verdict;
	akey.client[0] = f->saddr; /* per packet, the client is its address */
	akey.kind = KPR_AFFINITY_ADDR;
	choice->backend = lb4_select_backend(&key, svc, &akey, &choice->backend_id);
	if (!choice->backend)
		return reject(skb, &f->l4, KPR_TAIL_REJECT4);
	choice->rev_nat_id = svc->rev_nat_id;
	return TC_NEXT;
}

/* Both entries name the backend and the frontend the client dialled (its replies come from there). */
static __always_inline void ct4_new(struct ct4_pair *ct, const struct flow4 *f, const struct choice4 *choice,
				    __u64 now)
{
	ct4_key(&ct->okey, f, KPR_CT_ORIGINAL);
	ct->rkey.src = choice->backend->addr;
	ct->rkey.sport = choice->backend->port;
	ct->rkey.proto = f->l4.proto;
	ct->rkey.dir = KPR_CT_REPLY;
	ct->oval.last_seen_ns = ct->rval.last_seen_ns = now;
	ct->oval.backend_id = ct->rval.backend_id = choice->backend_id;
	ct->oval.rev_nat_id = ct->rval.rev_nat_id = choice->rev_nat_id;
	ct->oval.fe_addr = ct->rval.fe_addr = f->daddr;
	ct->oval.fe_port = ct->rval.fe_port = f->l4.dport;
	ct->oval.flags = ct_flags_after(0, f->l4.tcp_flags);
}

/* Pick a free masquerade port by inserting the reply entry. */
static __always_inline int snat4_port(struct ct_key4 *reply, struct ct_value4 *value, __u64 now)
{
	__u32 span = KPR_SNAT_PORT_MAX - KPR_SNAT_PORT_MIN + 1;
	struct ct_value4 *taken;
	long rc;

#pragma unroll
	for (int i = 0; i < KPR_SNAT_TRIES; i++) {
		reply->dport = bpf_htons(KPR_SNAT_PORT_MIN + bpf_get_prandom_u32() % span);
		rc = ct4.insert(reply, value);
		if (rc == 0 || rc == -E2BIG) /* -E2BIG: conntrack is full, not the port range */
			return rc;
		/* A port whose flow has expired is free again, before the agent's collection of expired flows. */
		taken = ct4.lookup(reply);
		if (taken && ct_expired(taken->last_seen_ns, taken->flags, reply->proto, now) &&
		    ct4.update(reply, value) == 0)
			return 0;
	}
	return -EADDRINUSE;
}

/* Conntrack and SNAT: a new flow's entries, the REPLY one first. A node-local backend (or a chained pod's flow: direct)
 * answers the client itself (a pod's own address is routable in the cluster), and egress toward the client shows the
 * reply as coming from the frontend. A backend on another node gets the flow masqueraded to this device's address, so
 * the reply comes back through this node. *snat: what the rewrite step needs of the ORIGINAL entry. */
static __always_inline int ct4_create(struct __sk_buff *skb, const struct flow4 *f, const struct choice4 *choice,
				      bool direct, __u64 now, struct snat4 *snat)
{
	struct ct4_pair ct = {};
	__u32 ifindex = skb->ifindex;
	struct device_info *dev;
	int rc;

	ct4_new(&ct, f, choice, now);
	if (direct) {
		ct.rkey.dst = f->saddr;
		ct.rkey.dport = f->l4.sport;
		if (ct4.update(&ct.rkey, &ct.rval))
			return drop(KPR_CNT_TC_DROP_CT_FULL);
	} else {
		dev = devices.lookup(&ifindex);
		if (!dev || !dev->addr4)
			return drop(KPR_CNT_TC_DROP_FIB);
		ct.rkey.dst = dev->addr4;
		ct.rval.addr = f->saddr;
		ct.rval.port = f->l4.sport;
		ct.rval.flags = KPR_CT_F_SNAT;
		rc = snat4_port(&ct.rkey, &ct.rval, now);
		if (rc)
			return drop(rc == -E2BIG ? KPR_CNT_TC_DROP_CT_FULL : KPR_CNT_TC_DROP_SNAT_PORTS);
		ct.oval.addr = dev->addr4;
		ct.oval.port = ct.rkey.dport;
		ct.oval.flags |= KPR_CT_F_SNAT;
		counter_inc(KPR_CNT_TC_SNAT);
	}
	if (ct4.update(&ct.okey, &ct.oval)) {
		ct4.delete(&ct.rkey);
		return drop(KPR_CNT_TC_DROP_CT_FULL);
	}
	counter_inc(KPR_CNT_TC_CT_NEW);
	snat->addr = ct.oval.addr;
	snat->port = ct.oval.port;
	snat->flags = ct.oval.flags;
	return TC_NEXT;
}

/* Rewrite: a packet of a flow, new or tracked, on to its backend; masqueraded (ct_flags), from the node address:port
 * and straight out of the device toward the backend. */
static __always_inline int forward4(struct __sk_buff *skb, struct flow4 *f, const struct backend4 *backend,
				    __u8 ct_flags, __be32 snat_addr, __be16 snat_port)
{
	if (rewrite4(skb, f, true, backend->addr, backend->port))
		return drop(KPR_CNT_TC_DROP_REWRITE);
	counter_inc(KPR_CNT_TC_DNAT);
	if (!(ct_flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	if (rewrite4(skb, f, false, snat_addr, snat_port))
		return drop(KPR_CNT_TC_DROP_REWRITE);
	return redirect4(skb, f->saddr, f->daddr, &f->l4);
}

/* A new flow to a frontend: select -> conntrack (and SNAT) -> rewrite. */
static __always_inline int new_flow4(struct __sk_buff *skb, struct flow4 *f, __u64 now, bool from_pod)
{
	struct choice4 choice = {};
	struct snat4 snat = {};
	int verdict;

	verdict = select4(skb, f, from_pod, &choice);
	if (verdict == TC_NEXT)
		verdict = ct4_create(skb, f, &choice, from_pod || (choice.backend->flags & KPR_BACKEND_F_NODE_LOCAL), now,
				     &snat);
	if (verdict != TC_NEXT)
		return verdict;
	return forward4(skb, f, choice.backend, snat.flags, snat.addr, snat.port);
}

/* A packet of a tracked flow follows its ORIGINAL entry (*key) while the entry lives and the flow keeps its backend;
 * otherwise the entry goes and the flow picks again (TC_NEXT). */
static __always_inline int established4(struct __sk_buff *skb, struct flow4 *f, struct ct_key4 *key, __u64 now)
{
	struct ct_value4 *ct = ct4.lookup(key);
	struct backend4 *backend;
	__u32 backend_id;

	if (!ct || ct_expired(ct->last_seen_ns, ct->flags, f->l4.proto, now))
		return TC_NEXT;
	backend_id = ct->backend_id;
	backend = backends4.lookup(&backend_id);
	if (backend && ct_keeps_backend(backend->state, ct->flags, &f->l4))
		return forward4(skb, f, backend, ct_touch(&ct->last_seen_ns, &ct->flags, now, f->l4.tcp_flags),
				ct->addr, ct->port);
	counter_inc(KPR_CNT_TC_CT_STALE); /* its backend went away or stopped serving UDP: pick again */
	ct4.delete(key);
	return TC_NEXT;
}

/* A reply shown as coming from the frontend the client dialled: a node-local backend's at egress, or a masqueraded
 * flow's at ingress, which also goes back to the client (its REPLY entry remembers it) straight out of a device. */
static __always_inline int reverse4(struct __sk_buff *skb, struct flow4 *f, struct ct_value4 *ct, bool masqueraded,
				    __u64 now)
{
	ct_touch(&ct->last_seen_ns, &ct->flags, now, f->l4.tcp_flags);
	if (rewrite4(skb, f, false, ct->fe_addr, ct->fe_port) ||
	    (masqueraded && rewrite4(skb, f, true, ct->addr, ct->port)))
		return drop(KPR_CNT_TC_DROP_REWRITE);
	counter_inc(KPR_CNT_TC_REVNAT);
	return masqueraded ? redirect4(skb, f->saddr, f->daddr, &f->l4) : TC_ACT_OK;
}

/* ---- IPv6 flows (the same steps) ---- */

static __always_inline bool zero6(const __be32 *a)
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

static __always_inline void ct6_key(struct ct_key6 *key, const struct flow6 *f, __u8 dir)
{
	__builtin_memcpy(key->src, f->saddr, 16);
	__builtin_memcpy(key->dst, f->daddr, 16);
	key->sport = f->l4.sport;
	key->dport = f->l4.dport;
	key->proto = f->l4.proto;
	key->dir = dir;
}

struct choice6 {
	struct backend6 *backend;
	__u32 backend_id;
	__u32 rev_nat_id;
};

struct snat6 {
	__be32 addr[4];
	__be16 port;
	__u8 flags;
};

struct ct6_pair {
	struct ct_key6 okey;
	struct ct_key6 rkey;
	struct ct_value6 oval;
	struct ct_value6 rval;
};

static __always_inline int select6(struct __sk_buff *skb, const struct flow6 *f, bool from_pod, struct choice6 *choice)
{
	struct svc_key6 key = {};
	struct affinity_key akey = {};
	struct svc_value *svc;
	int verdict;

	__builtin_memcpy(key.addr, f->daddr, 16);
	key.port = f->l4.dport;
	key.proto = f->l4.proto;
	svc = lb6_lookup_frontend(&key, false);
	if (!svc || !tc_serves(svc, from_pod))
		return TC_ACT_OK;
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !lb6_src_allowed(svc->rev_nat_id, f->saddr))
		return drop(KPR_CNT_TC_DROP_SOURCE_RANGE);
	svc = lb6_select_scope(&key, svc, from_pod || pod_source6(f->saddr));
	verdict = tc_admit(skb, svc, &f->l4, KPR_TAIL_REJECT6);
	if (verdict != TC_NEXT)
		return verdict;
	__builtin_memcpy(akey.client, f->saddr, 16);
	akey.kind = KPR_AFFINITY_ADDR;
	choice->backend = lb6_select_backend(&key, svc, &akey, &choice->backend_id);
	if (!choice->backend)
		return reject(skb, &f->l4, KPR_TAIL_REJECT6);
	choice->rev_nat_id = svc->rev_nat_id;
	return TC_NEXT;
}

static __always_inline void ct6_new(struct ct6_pair *ct, const struct flow6 *f, const struct choice6 *choice,
				    __u64 now)
{
	ct6_key(&ct->okey, f, KPR_CT_ORIGINAL);
	__builtin_memcpy(ct->rkey.src, choice->backend->addr, 16);
	ct->rkey.sport = choice->backend->port;
	ct->rkey.proto = f->l4.proto;
	ct->rkey.dir = KPR_CT_REPLY;
	ct->oval.last_seen_ns = ct->rval.last_seen_ns = now;
	ct->oval.backend_id = ct->rval.backend_id = choice->backend_id;
	ct->oval.rev_nat_id = ct->rval.rev_nat_id = choice->rev_nat_id;
	__builtin_memcpy(ct->oval.fe_addr, f->daddr, 16);
	__builtin_memcpy(ct->rval.fe_addr, f->daddr, 16);
	ct->oval.fe_port = ct->rval.fe_port = f->l4.dport;
	ct->oval.flags = ct_flags_after(0, f->l4.tcp_flags);
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
		if (rc == 0 || rc == -E2BIG)
			return rc;
		taken = ct6.lookup(reply);
		if (taken && ct_expired(taken->last_seen_ns, taken->flags, reply->proto, now) &&
		    ct6.update(reply, value) == 0)
			return 0;
	}
	return -EADDRINUSE;
}

static __always_inline int ct6_create(struct __sk_buff *skb, const struct flow6 *f, const struct choice6 *choice,
				      bool direct, __u64 now, struct snat6 *snat)
{
	struct ct6_pair ct = {};
	__u32 ifindex = skb->ifindex;
	struct device_info *dev;
	int rc;

	ct6_new(&ct, f, choice, now);
	if (direct) {
		__builtin_memcpy(ct.rkey.dst, f->saddr, 16);
		ct.rkey.dport = f->l4.sport;
		if (ct6.update(&ct.rkey, &ct.rval))
			return drop(KPR_CNT_TC_DROP_CT_FULL);
	} else {
		dev = devices.lookup(&ifindex);
		if (!dev || zero6(dev->addr6))
			return drop(KPR_CNT_TC_DROP_FIB);
		__builtin_memcpy(ct.rkey.dst, dev->addr6, 16);
		__builtin_memcpy(ct.rval.addr, f->saddr, 16);
		ct.rval.port = f->l4.sport;
		ct.rval.flags = KPR_CT_F_SNAT;
		rc = snat6_port(&ct.rkey, &ct.rval, now);
		if (rc)
			return drop(rc == -E2BIG ? KPR_CNT_TC_DROP_CT_FULL : KPR_CNT_TC_DROP_SNAT_PORTS);
		__builtin_memcpy(ct.oval.addr, dev->addr6, 16);
		ct.oval.port = ct.rkey.dport;
		ct.oval.flags |= KPR_CT_F_SNAT;
		counter_inc(KPR_CNT_TC_SNAT);
	}
	if (ct6.update(&ct.okey, &ct.oval)) {
		ct6.delete(&ct.rkey);
		return drop(KPR_CNT_TC_DROP_CT_FULL);
	}
	counter_inc(KPR_CNT_TC_CT_NEW);
	__builtin_memcpy(snat->addr, ct.oval.addr, 16);
	snat->port = ct.oval.port;
	snat->flags = ct.oval.flags;
	return TC_NEXT;
}

static __always_inline int forward6(struct __sk_buff *skb, struct flow6 *f, const struct backend6 *backend,
				    __u8 ct_flags, const __be32 *snat_addr, __be16 snat_port)
{
	if (rewrite6(skb, f, true, backend->addr, backend->port))
		return drop(KPR_CNT_TC_DROP_REWRITE);
	counter_inc(KPR_CNT_TC_DNAT);
	if (!(ct_flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	if (rewrite6(skb, f, false, snat_addr, snat_port))
		return drop(KPR_CNT_TC_DROP_REWRITE);
	return redirect6(skb, f->saddr, f->daddr, &f->l4);
}

static __always_inline int new_flow6(struct __sk_buff *skb, struct flow6 *f, __u64 now, bool from_pod)
{
	struct choice6 choice = {};
	struct snat6 snat = {};
	int verdict;

	verdict = select6(skb, f, from_pod, &choice);
	if (verdict == TC_NEXT)
		verdict = ct6_create(skb, f, &choice, from_pod || (choice.backend->flags & KPR_BACKEND_F_NODE_LOCAL), now,
				     &snat);
	if (verdict != TC_NEXT)
		return verdict;
	return forward6(skb, f, choice.backend, snat.flags, snat.addr, snat.port);
}

static __always_inline int established6(struct __sk_buff *skb, struct flow6 *f, struct ct_key6 *key, __u64 now)
{
	struct ct_value6 *ct = ct6.lookup(key);
	struct backend6 *backend;
	__u32 backend_id;

	if (!ct || ct_expired(ct->last_seen_ns, ct->flags, f->l4.proto, now))
		return TC_NEXT;
	backend_id = ct->backend_id;
	backend = backends6.lookup(&backend_id);
	if (backend && ct_keeps_backend(backend->state, ct->flags, &f->l4))
		return forward6(skb, f, backend, ct_touch(&ct->last_seen_ns, &ct->flags, now, f->l4.tcp_flags),
				ct->addr, ct->port);
	counter_inc(KPR_CNT_TC_CT_STALE);
	ct6.delete(key);
	return TC_NEXT;
}

static __always_inline int reverse6(struct __sk_buff *skb, struct flow6 *f, struct ct_value6 *ct, bool masqueraded,
				    __u64 now)
{
	ct_touch(&ct->last_seen_ns, &ct->flags, now, f->l4.tcp_flags);
	if (rewrite6(skb, f, false, ct->fe_addr, ct->fe_port) ||
	    (masqueraded && rewrite6(skb, f, true, ct->addr, ct->port)))
		return drop(KPR_CNT_TC_DROP_REWRITE);
	counter_inc(KPR_CNT_TC_REVNAT);
	return masqueraded ? redirect6(skb, f->saddr, f->daddr, &f->l4) : TC_ACT_OK;
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

/* Tail-call the ICMP error program `tail` when the packet is an ICMP error (IPv4 without options, not a fragment).
 * Anything else is left to the stack, and so is the error if the call fails (counted). */
static __always_inline int icmp4_error_tail(struct __sk_buff *skb, __u32 tail)
{
	struct iphdr ip;
	__u8 type;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl != 5 ||
	    ip.protocol != IPPROTO_ICMP || (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), &type, 1))
		return TC_ACT_OK;
	if (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED && type != ICMP_PARAMETERPROB)
		return TC_ACT_OK;
	tc_tails.call(skb, tail);
	counter_inc(KPR_CNT_ERR_TAIL_CALL);
	return TC_ACT_OK;
}

static __always_inline int icmp6_error_tail(struct __sk_buff *skb, __u32 tail)
{
	struct ipv6hdr ip;
	__u8 type;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.version != 6 || ip.nexthdr != IPPROTO_ICMPV6 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(ip), &type, 1))
		return TC_ACT_OK;
	if (type != ICMPV6_DEST_UNREACH && type != ICMPV6_PKT_TOOBIG && type != ICMPV6_TIME_EXCEED &&
	    type != ICMPV6_PARAMPROB)
		return TC_ACT_OK;
	tc_tails.call(skb, tail);
	counter_inc(KPR_CNT_ERR_TAIL_CALL);
	return TC_ACT_OK;
}

/* An ICMP error's outer header and the packet it quotes, when that is TCP, UDP or SCTP; *key becomes the flow's key in
 * the direction opposite to the quoted packet's (the quoted packet reversed), as a REPLY entry. */
static __always_inline int icmp4_quote(struct __sk_buff *skb, struct iphdr *outer, struct quote4 *q,
				       struct ct_key4 *key)
{
	if (bpf_skb_load_bytes(skb, ETH_HLEN, outer, sizeof(*outer)) ||
	    bpf_skb_load_bytes(skb, QUOTE4_OFF, q, sizeof(*q)) || q->ip.version != 4 || q->ip.ihl != 5 ||
	    !tracked_proto(q->ip.protocol))
		return -1;
	key->src = q->ip.daddr;
	key->sport = q->dport;
	key->dst = q->ip.saddr;
	key->dport = q->sport;
	key->proto = q->ip.protocol;
	key->dir = KPR_CT_REPLY;
	return 0;
}

static __always_inline int icmp6_quote(struct __sk_buff *skb, struct ipv6hdr *outer, struct quote6 *q,
				       struct ct_key6 *key)
{
	if (bpf_skb_load_bytes(skb, ETH_HLEN, outer, sizeof(*outer)) ||
	    bpf_skb_load_bytes(skb, QUOTE6_OFF, q, sizeof(*q)) || q->ip.version != 6 || !tracked_proto(q->ip.nexthdr))
		return -1;
	__builtin_memcpy(key->src, &q->ip.daddr, 16);
	key->sport = q->dport;
	__builtin_memcpy(key->dst, &q->ip.saddr, 16);
	key->dport = q->sport;
	key->proto = q->ip.nexthdr;
	key->dir = KPR_CT_REPLY;
	return 0;
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

/* ---- the programs ---- */

/* Node devices and chained pods' veths, one program per family and direction: the agent attaches each as a tc filter
 * matching its protocol (ip or ipv6), so each has a stack frame of its own. Names start with kpr_ so cleanup and status
 * recognise them. */

static __always_inline int ingress4(struct __sk_buff *skb, bool from_pod)
{
	struct flow4 f = {};
	struct ct_key4 key = {};
	struct ct_value4 *ct;
	__u64 now = bpf_ktime_get_ns();
	int verdict;

	if (parse4(skb, &f))
		return from_pod ? TC_ACT_OK : icmp4_error_tail(skb, KPR_TAIL_ICMP4_IN);
	ct4_key(&key, &f, KPR_CT_ORIGINAL);
	verdict = established4(skb, &f, &key, now);
	if (verdict != TC_NEXT)
		return verdict;
	key.dir = KPR_CT_REPLY;
	ct = from_pod ? NULL : ct4.lookup(&key); /* masqueraded replies come back on node devices only */
	if (ct && (ct->flags & KPR_CT_F_SNAT))
		return reverse4(skb, &f, ct, true, now); /* from the frontend the client dialled, to the client */
	return new_flow4(skb, &f, now, from_pod);
}

static __always_inline int ingress6(struct __sk_buff *skb, bool from_pod)
{
	struct flow6 f = {};
	struct ct_key6 key = {};
	struct ct_value6 *ct;
	__u64 now = bpf_ktime_get_ns();
	int verdict;

	if (parse6(skb, &f))
		return from_pod ? TC_ACT_OK : icmp6_error_tail(skb, KPR_TAIL_ICMP6_IN);
	ct6_key(&key, &f, KPR_CT_ORIGINAL);
	verdict = established6(skb, &f, &key, now);
	if (verdict != TC_NEXT)
		return verdict;
	key.dir = KPR_CT_REPLY;
	ct = from_pod ? NULL : ct6.lookup(&key);
	if (ct && (ct->flags & KPR_CT_F_SNAT))
		return reverse6(skb, &f, ct, true, now);
	return new_flow6(skb, &f, now, from_pod);
}

/* Egress: a node-local backend's reply leaves for the client, shown as coming from the frontend it dialled. */
static __always_inline int egress4(struct __sk_buff *skb)
{
	struct flow4 f = {};
	struct ct_key4 key = {};
	struct ct_value4 *ct;

	if (parse4(skb, &f))
		return icmp4_error_tail(skb, KPR_TAIL_ICMP4_OUT);
	ct4_key(&key, &f, KPR_CT_REPLY);
	ct = ct4.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	return reverse4(skb, &f, ct, false, bpf_ktime_get_ns());
}

static __always_inline int egress6(struct __sk_buff *skb)
{
	struct flow6 f = {};
	struct ct_key6 key = {};
	struct ct_value6 *ct;

	if (parse6(skb, &f))
		return icmp6_error_tail(skb, KPR_TAIL_ICMP6_OUT);
	ct6_key(&key, &f, KPR_CT_REPLY);
	ct = ct6.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	return reverse6(skb, &f, ct, false, bpf_ktime_get_ns());
}

int kpr_tc_in4(struct __sk_buff *skb)
{
	return ingress4(skb, false);
}

int kpr_tc_in6(struct __sk_buff *skb)
{
	return ingress6(skb, false);
}

/* CNI chaining: the ingress of a pod's host-side veth (traffic from the pod). Replies toward the pod use the egress
 * programs below. The agent pins these so kpr-cni attaches them without a compiler. */

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

	if (parse4(skb, &f) || reject4(skb, &f))
		return drop(KPR_CNT_TC_DROP_ANSWER);
	return rejected(skb, &f.l4);
}

int kpr_tc_rej6(struct __sk_buff *skb)
{
	struct flow6 f = {};

	if (parse6(skb, &f) || reject6(skb, &f))
		return drop(KPR_CNT_TC_DROP_ANSWER);
	return rejected(skb, &f.l4);
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
		return drop(KPR_CNT_TC_DROP_ANSWER);
	if (!(ip.frag_off & bpf_htons(IP_DF)))
		return drop(KPR_CNT_TC_DROP_TOO_BIG);
	if (icmp4_answer(skb, &f, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, bpf_htonl(mtu)))
		return drop(KPR_CNT_TC_DROP_ANSWER);
	counter_inc(KPR_CNT_TC_TOO_BIG);
	return tail_call_or_drop(skb, KPR_TAIL_ICMP4_IN);
}

int kpr_tc_toobig6(struct __sk_buff *skb)
{
	struct flow6 f = {};
	__u32 mtu = skb->cb[0];

	if (parse6(skb, &f) || icmp6_answer(skb, &f, ICMPV6_PKT_TOOBIG, 0, bpf_htonl(mtu)))
		return drop(KPR_CNT_TC_DROP_ANSWER);
	counter_inc(KPR_CNT_TC_TOO_BIG);
	return tail_call_or_drop(skb, KPR_TAIL_ICMP6_IN);
}

/* Arriving on a node device: an error about a packet this node sent on for a tracked flow. */
int kpr_tc_icmp4_in(struct __sk_buff *skb)
{
	struct flow_l4 icmp = { .proto = IPPROTO_ICMP };
	struct iphdr outer;
	struct quote4 q;
	struct ct_key4 key = {};
	struct ct_value4 *ct;
	struct backend4 *backend;
	__u32 backend_id;

	if (icmp4_quote(skb, &outer, &q, &key))
		return TC_ACT_OK;
	ct = ct4.lookup(&key);
	if (ct && (ct->flags & KPR_CT_F_SNAT)) {
		/* About a packet masqueraded on to a backend of another node (node:port -> backend): the client hears of
		 * it as about what it sent (client -> frontend), from the frontend. */
		__be32 client = ct->addr, frontend = ct->fe_addr;
		__be16 client_port = ct->port, frontend_port = ct->fe_port;

		if (icmp4_translate(skb, &outer, &q, frontend, client, client, client_port, frontend, frontend_port))
			return drop(KPR_CNT_TC_DROP_ICMP);
		return redirect4(skb, frontend, client, &icmp);
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
			return drop(KPR_CNT_TC_DROP_ICMP);
		return redirect4(skb, node, backend->addr, &icmp);
	}
	/* About a reply of a backend on this node: it hears of it; the stack delivers it. */
	if (icmp4_translate(skb, &outer, &q, outer.saddr, backend->addr, backend->addr, backend->port, q.ip.daddr,
			    q.dport))
		return drop(KPR_CNT_TC_DROP_ICMP);
	return TC_ACT_OK;
}

int kpr_tc_icmp6_in(struct __sk_buff *skb)
{
	struct flow_l4 icmp = { .proto = IPPROTO_ICMPV6 };
	struct ipv6hdr outer;
	struct quote6 q;
	struct ct_key6 key = {};
	struct ct_value6 *ct;
	struct backend6 *backend;
	__u32 backend_id;

	if (icmp6_quote(skb, &outer, &q, &key))
		return TC_ACT_OK;
	ct = ct6.lookup(&key);
	if (ct && (ct->flags & KPR_CT_F_SNAT)) {
		__be32 client[4], frontend[4];
		__be16 client_port = ct->port, frontend_port = ct->fe_port;

		__builtin_memcpy(client, ct->addr, 16);
		__builtin_memcpy(frontend, ct->fe_addr, 16);
		if (icmp6_translate(skb, &outer, &q, frontend, client, client, client_port, frontend, frontend_port))
			return drop(KPR_CNT_TC_DROP_ICMP);
		return redirect6(skb, frontend, client, &icmp);
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
			return drop(KPR_CNT_TC_DROP_ICMP);
		return redirect6(skb, node, backend_addr, &icmp);
	}
	{
		__be32 source[4], backend_addr[4], client[4];

		__builtin_memcpy(source, &outer.saddr, 16);
		__builtin_memcpy(backend_addr, backend->addr, 16);
		__builtin_memcpy(client, &q.ip.daddr, 16);
		if (icmp6_translate(skb, &outer, &q, source, backend_addr, backend_addr, backend->port, client, q.dport))
			return drop(KPR_CNT_TC_DROP_ICMP);
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

	if (icmp4_quote(skb, &outer, &q, &key))
		return TC_ACT_OK;
	ct = ct4.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	if (icmp4_translate(skb, &outer, &q, ct->fe_addr, outer.daddr, q.ip.saddr, q.sport, ct->fe_addr, ct->fe_port))
		return drop(KPR_CNT_TC_DROP_ICMP);
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

	if (icmp6_quote(skb, &outer, &q, &key))
		return TC_ACT_OK;
	ct = ct6.lookup(&key);
	if (!ct || (ct->flags & KPR_CT_F_SNAT))
		return TC_ACT_OK;
	__builtin_memcpy(frontend, ct->fe_addr, 16);
	frontend_port = ct->fe_port;
	__builtin_memcpy(dest, &outer.daddr, 16);
	__builtin_memcpy(client, &q.ip.saddr, 16);
	if (icmp6_translate(skb, &outer, &q, frontend, dest, client, q.sport, frontend, frontend_port))
		return drop(KPR_CNT_TC_DROP_ICMP);
	return TC_ACT_OK;
}
