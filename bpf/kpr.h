/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kpr.h - the one definition of kpr's BPF map ABI.
 *
 * Every key, value, flag, counter and map that the datapath and the agent share lives here.
 * kpr/datapath/abi.py mirrors it with ctypes; tests/datapath/test_abi.py compiles this header with BCC and
 * compares every size and offset (and parses the #defines below). Addresses and ports are in network byte order.
 * Structs carry explicit pad fields and are zero-initialised on the stack, so hash keys never hold garbage.
 */
#ifndef KPR_H
#define KPR_H

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>

/* The bpffs directory the maps are pinned in; the agent passes it with -DKPR_PIN_DIR="...". */
#ifndef KPR_PIN_DIR
#error "KPR_PIN_DIR must name the bpffs directory the maps are pinned in"
#endif

/* Map sizes: defaults hold 65,536 frontends and 262,144 backends; the agent overrides them with -D. */
#ifndef KPR_SERVICES_MAX
#define KPR_SERVICES_MAX 327680 /* master entries + backend slots, per family */
#endif
#ifndef KPR_BACKENDS_MAX
#define KPR_BACKENDS_MAX 262144
#endif
#ifndef KPR_REV_NAT_MAX
#define KPR_REV_NAT_MAX 65536
#endif
#ifndef KPR_SOCK_REV_NAT_MAX
#define KPR_SOCK_REV_NAT_MAX 262144
#endif
#ifndef KPR_AFFINITY_MAX
#define KPR_AFFINITY_MAX 65536
#endif
#ifndef KPR_CT_MAX
#define KPR_CT_MAX 262144 /* per family; each translated flow takes two entries (original + reply) */
#endif
#ifndef KPR_SRC_RANGES_MAX
#define KPR_SRC_RANGES_MAX 16384
#endif
#ifndef KPR_NODEPORT_ADDRS_MAX
#define KPR_NODEPORT_ADDRS_MAX 4096 /* the node's addresses NodePorts answer on, per family */
#endif
#ifndef KPR_NETNS_ADDRS_MAX
#define KPR_NETNS_ADDRS_MAX 16384 /* network namespaces (pods) of the node */
#endif

/* Source ports the tc path uses when it masquerades to the node address. Outside the kernel's default
 * ip_local_port_range (32768-60999) and the NodePort range (30000-32767), so never a node's own connection. */
#define KPR_SNAT_PORT_MIN 61000
#define KPR_SNAT_PORT_MAX 65535
#define KPR_SNAT_TRIES 16

/* Conntrack lifetimes (tc path), refreshed by every packet. ct4/ct6 are plain hashes, not LRUs: like netfilter
 * (which never early-drops an assured connection), a full table refuses new flows (tc_drop_ct_full) instead of
 * evicting established ones. The agent deletes expired flows (kpr/datapath/flows.py, collect_expired). */
#define KPR_CT_TCP_LIFETIME_S 21600 /* established TCP: 6 h, like nf_conntrack's 5 days but bounded */
#define KPR_CT_CLOSING_LIFETIME_S 10 /* after a FIN or RST */
#define KPR_CT_UDP_LIFETIME_S 60
#define KPR_CT_SCTP_LIFETIME_S 210 /* nf_conntrack's established SCTP timeout: heartbeats (30 s) keep it alive */

/* Service lookup scopes (svc_key.scope). Every lookup starts at the default scope; a master entry flagged
 * TWO_SCOPES sends traffic that starts inside the cluster (sockets on the node, pods) to the internal scope. */
#define KPR_SCOPE_DEFAULT 0
#define KPR_SCOPE_INTERNAL 1

/* Master entry flags (svc_value.flags, slot 0). */
#define KPR_SVC_F_AFFINITY 0x01   /* sessionAffinity ClientIP, timeout in affinity_timeout */
#define KPR_SVC_F_TWO_SCOPES 0x02 /* in-cluster traffic uses the KPR_SCOPE_INTERNAL entry */
#define KPR_SVC_F_EMPTY_DROP 0x04 /* no backend in this scope but some elsewhere: drop instead of reject */
#define KPR_SVC_F_EXTERNAL 0x08 /* NodePort, LoadBalancer or externalIP: the tc path serves it */
#define KPR_SVC_F_SOURCE_RANGES 0x10 /* loadBalancerSourceRanges: sources must match src_ranges4/6 */

/* Backend states (backend.state): what becomes of flows already on a backend; slots decide where new flows go.
 * kube-proxy never deletes TCP conntrack entries and deletes UDP ones only when their endpoint stops serving. */
#define KPR_BACKEND_ACTIVE 0      /* ready */
#define KPR_BACKEND_TERMINATING 1 /* serving but not ready (terminating): its flows stay */
#define KPR_BACKEND_NOT_SERVING 2 /* neither ready nor serving: TCP flows stay, UDP flows pick again */
#define KPR_BACKEND_GONE 3        /* in no EndpointSlice any more: kept only while tracked TCP flows name it */
#define KPR_BACKEND_F_NODE_LOCAL 0x01

/* What identifies a client in the affinity map (affinity_key.kind). */
#define KPR_AFFINITY_NETNS 1 /* socket LB: the client's network namespace cookie */
#define KPR_AFFINITY_ADDR 2  /* per-packet LB: the client's address */

/* Indexes into the per-CPU counters array; `kpr status` names them. Never renumber, only append. */
#define KPR_CNT_XLATE_FWD 0              /* destination rewritten to a backend */
#define KPR_CNT_XLATE_REV 1              /* peer address shown as the frontend again */
#define KPR_CNT_REJECT_NO_BACKEND 2      /* frontend without a usable backend: refused */
#define KPR_CNT_DROP_NO_LOCAL_BACKEND 3  /* Local policy, endpoints only on other nodes */
#define KPR_CNT_ERR_SLOT_MISSING 4       /* a slot below count is missing (should never happen) */
#define KPR_CNT_ERR_BACKEND_MISSING 5    /* a slot names an unknown backend (should never happen) */
#define KPR_CNT_ERR_SOCK_REV_NAT 6       /* could not record a reverse translation */
#define KPR_CNT_REV_NAT_STALE 7          /* a recorded reverse translation outlived its frontend */
#define KPR_CNT_AFFINITY_HIT 8           /* ClientIP affinity reused a backend */
#define KPR_CNT_AFFINITY_NEW 9           /* ClientIP affinity picked (again) after a miss or timeout */
#define KPR_CNT_ERR_SCOPE_MISSING 10     /* TWO_SCOPES without an internal entry (should never happen) */
#define KPR_CNT_TC_DNAT 11               /* tc: a packet sent on to its backend */
#define KPR_CNT_TC_CT_NEW 12             /* tc: a new flow recorded in conntrack */
#define KPR_CNT_TC_REVNAT 13             /* tc: a reply shown as coming from the frontend */
#define KPR_CNT_TC_SNAT 14               /* tc: a new flow masqueraded to the node address */
#define KPR_CNT_TC_REJECT_TCP 15         /* tc: no backend, answered with a TCP reset */
#define KPR_CNT_TC_REJECT_UDP 16         /* tc: no backend, answered with ICMP port unreachable */
#define KPR_CNT_TC_DROP_NO_LOCAL 17      /* tc: externalTrafficPolicy=Local without a local backend */
#define KPR_CNT_TC_DROP_SOURCE_RANGE 18  /* tc: source outside loadBalancerSourceRanges */
#define KPR_CNT_TC_DROP_SNAT_PORTS 19    /* tc: no free masquerade port */
#define KPR_CNT_TC_DROP_FIB 20           /* tc: no route to send a translated packet on */
#define KPR_CNT_TC_DROP_CT_FULL 21       /* tc: could not record a flow */
#define KPR_CNT_TC_CT_STALE 22           /* tc: a flow's backend is gone (or stopped serving UDP); picked again */
#define KPR_CNT_TC_RESET_UNTRACKED 23    /* tc: a TCP segment of no tracked flow to a frontend: reset, not passed on */
#define KPR_CNT_REJECT_SOURCE_RANGE 24   /* socket: a client outside loadBalancerSourceRanges: refused (EPERM) */
#define KPR_CNT_SOURCE_UNKNOWN 25        /* socket: a source-ranged frontend dialled from a namespace whose address
					  * kpr does not know yet: refused (EPERM) */
#define KPR_CNT_TC_ICMP_RELATED 26       /* tc: an ICMP error about a tracked flow, translated for the other side */
#define KPR_CNT_TC_TOO_BIG 27            /* tc: a translated packet too big for its device: answered with
					  * Fragmentation Needed / Packet Too Big, as forwarding would */
#define KPR_CNT_TC_DROP_TOO_BIG 28       /* tc: the same without DF (IPv4): dropped, kpr does not fragment */
#define KPR_CNT_TC_SCTP_CRC 29           /* tc: an SCTP packet's CRC32c updated for a rewritten port */
#define KPR_CNT_ERR_TAIL_CALL 30         /* tc: a tail call found no program in tc_tails (should never happen): a
					  * reject or too-big answer dropped instead, an ICMP error left untranslated */
#define KPR_CNT_TC_DROP_REWRITE 31       /* tc: a translation could not be written into the packet: dropped, never
					  * sent on half-translated */
#define KPR_CNT_TC_DROP_ANSWER 32        /* tc: a reject or too-big answer could not be built: dropped unanswered */
#define KPR_CNT_TC_DROP_ICMP 33          /* tc: an ICMP error about a tracked flow could not be translated: dropped */
#define KPR_CNT_TC_DROP_RESET 34         /* tc: a TCP reset to a frontend without a backend, or of no tracked flow:
					  * dropped (a reset is never answered) */
#define KPR_CNT_MAX 64 /* entries of the counters map: room to append without resizing it */

/* services4/6 key: a frontend address:port/proto, its scope, and slot (0 = master, 1..count = backends). */
struct svc_key4 {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 scope;
	__u16 slot;
	__u16 pad;
};

struct svc_key6 {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 scope;
	__u16 slot;
	__u16 pad;
};

/* services4/6 value: slot 0 is the master entry (count, rev_nat_id, flags, affinity_timeout); slot n > 0 uses
 * backend_id only. */
struct svc_value {
	__u32 backend_id;
	__u32 rev_nat_id;
	__u32 affinity_timeout; /* seconds */
	__u16 count;
	__u8 flags;
	__u8 pad;
};

/* backends4/6 value, keyed by a __u32 backend id (never 0). */
struct backend4 {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 state;
	__u8 flags;
	__u8 pad[3];
};

struct backend6 {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 state;
	__u8 flags;
	__u8 pad[3];
};

/* rev_nat4/6 value, keyed by a __u32 rev_nat id (never 0): the frontend a translated flow must appear to use. */
struct rev_nat4 {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct rev_nat6 {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

/* sock_rev_nat4/6: {socket cookie, backend} -> frontend, so recvmsg and getpeername show what the socket dialled. */
struct sock_rev_nat_key4 {
	__u64 cookie;
	__be32 addr;
	__be16 port;
	__u16 pad;
};

struct sock_rev_nat4 {
	__be32 addr;
	__be16 port;
	__u16 pad;
	__u32 rev_nat_id;
};

struct sock_rev_nat_key6 {
	__u64 cookie;
	__be32 addr[4];
	__be16 port;
	__u16 pad[3];
};

struct sock_rev_nat6 {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 rev_nat_id;
};

/* affinity: {client, frontend} -> the backend it was last sent to and when (sessionAffinity ClientIP). */
struct affinity_key {
	__be32 client[4]; /* netns cookie in the first 8 bytes, or the client address */
	__u32 rev_nat_id;
	__u8 kind;        /* KPR_AFFINITY_* */
	__u8 pad[3];
};

struct affinity_value {
	__u64 last_used_ns; /* bpf_ktime_get_ns() */
	__u32 backend_id;
	__u32 pad;
};

/* affinity_match: present while a backend is a slot of a frontend, so affinity never sticks to a removed one. */
struct affinity_match_key {
	__u32 backend_id;
	__u32 rev_nat_id;
};

/* svc_names: what a frontend belongs to, for `kpr services` and for restoring ownership after a restart.
 * The datapath never reads it. */
struct svc_name {
	__u8 kind; /* 1 ClusterIP, 2 NodePort, 3 ExternalIP, 4 LoadBalancer */
	__u8 pad[3];
	char ns[64];
	char name[64];
	char port_name[16];
};

/* ct4/6: the tc path's flows. ORIGINAL entries are keyed by what the client sent (client -> frontend); REPLY entries by
 * what the backend sends back (backend -> client, or backend -> node address when masqueraded). */
#define KPR_CT_ORIGINAL 0
#define KPR_CT_REPLY 1
#define KPR_CT_F_SNAT 0x01    /* masqueraded to the node address */
#define KPR_CT_F_CLOSING 0x02 /* a FIN or RST was seen */

struct ct_key4 {
	__be32 src;
	__be32 dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* KPR_CT_* */
	__u16 pad;
};

struct ct_key6 {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

/* ORIGINAL: the backend and, when masqueraded, the node address:port used. REPLY: the client to restore (when
 * masqueraded). Both: the frontend address:port the client dialled, which replies show as their source (for a
 * NodePort, the node address it was reached on; rev_nat_id names the frontend entry). */
struct ct_value4 {
	__u64 last_seen_ns;
	__u32 backend_id;
	__u32 rev_nat_id;
	__be32 addr;
	__be16 port;
	__u8 flags; /* KPR_CT_F_* */
	__u8 pad;
	__be32 fe_addr;
	__be16 fe_port;
	__u16 pad2;
};

struct ct_value6 {
	__u64 last_seen_ns;
	__u32 backend_id;
	__u32 rev_nat_id;
	__be32 addr[4];
	__be16 port;
	__u8 flags;
	__u8 pad;
	__be32 fe_addr[4];
	__be16 fe_port;
	__u16 pad2;
	__u32 pad3;
};

/* src_ranges4/6 (LPM trie): {rev_nat_id, source prefix} present = allowed (loadBalancerSourceRanges). */
struct src_range_key4 {
	__u32 prefixlen; /* 32 (rev_nat_id) + the CIDR's bits */
	__be32 rev_nat_id;
	__be32 addr;
};

struct src_range_key6 {
	__u32 prefixlen;
	__be32 rev_nat_id;
	__be32 addr[4];
};

/* devices: the node devices the tc programs serve, by ifindex, with the addresses masquerading uses.
 * netns_addrs: the primary addresses of the node's network namespaces (its own and its pods'), by netns cookie, for
 * what a socket hook cannot see: the source address an unbound socket will use (loadBalancerSourceRanges). */
struct device_info {
	__be32 addr4;
	__be32 addr6[4];
};

/* A map's pin: its name and its layout version, "services4_v1". The version goes up whenever the key or value
 * layout changes, even at the same size, so that a new kpr never adopts (or copies entries from) a map of an older
 * layout: kpr/datapath/migrate.py moves those aside and tests/unit/test_abi_layouts.py fails on a layout change
 * without a new version. */
#define KPR_PIN(name, layout) KPR_PIN_DIR "/" name "_v" #layout

/* Control-plane-written maps are allocated on demand; the datapath-written ones (LRUs, conntrack) are preallocated,
 * so a packet never waits for memory. */
BPF_TABLE_PINNED("hash", struct svc_key4, struct svc_value, services4, KPR_SERVICES_MAX, KPR_PIN("services4", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct svc_key6, struct svc_value, services6, KPR_SERVICES_MAX, KPR_PIN("services6", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct backend4, backends4, KPR_BACKENDS_MAX, KPR_PIN("backends4", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct backend6, backends6, KPR_BACKENDS_MAX, KPR_PIN("backends6", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct rev_nat4, rev_nat4, KPR_REV_NAT_MAX, KPR_PIN("rev_nat4", 1), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct rev_nat6, rev_nat6, KPR_REV_NAT_MAX, KPR_PIN("rev_nat6", 1), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct svc_name, svc_names, KPR_REV_NAT_MAX, KPR_PIN("svc_names", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct sock_rev_nat_key4, struct sock_rev_nat4, sock_rev_nat4, KPR_SOCK_REV_NAT_MAX,
		 KPR_PIN("sock_rev_nat4", 1));
BPF_TABLE_PINNED("lru_hash", struct sock_rev_nat_key6, struct sock_rev_nat6, sock_rev_nat6, KPR_SOCK_REV_NAT_MAX,
		 KPR_PIN("sock_rev_nat6", 1));
BPF_TABLE_PINNED("lru_hash", struct affinity_key, struct affinity_value, affinity, KPR_AFFINITY_MAX,
		 KPR_PIN("affinity", 1));
BPF_TABLE_PINNED("hash", struct affinity_match_key, __u8, affinity_match, KPR_BACKENDS_MAX,
		 KPR_PIN("affinity_match", 1), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", __u32, __u64, counters, KPR_CNT_MAX, KPR_PIN("counters", 1));
BPF_TABLE_PINNED("hash", struct ct_key4, struct ct_value4, ct4, KPR_CT_MAX, KPR_PIN("ct4", 1));
BPF_TABLE_PINNED("hash", struct ct_key6, struct ct_value6, ct6, KPR_CT_MAX, KPR_PIN("ct6", 1));
BPF_TABLE_PINNED("lpm_trie", struct src_range_key4, __u8, src_ranges4, KPR_SRC_RANGES_MAX, KPR_PIN("src_ranges4", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct src_range_key6, __u8, src_ranges6, KPR_SRC_RANGES_MAX, KPR_PIN("src_ranges6", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct device_info, devices, 64, KPR_PIN("devices", 1));
BPF_TABLE_PINNED("hash", __u64, struct device_info, netns_addrs, KPR_NETNS_ADDRS_MAX, KPR_PIN("netns_addrs", 1),
		 BPF_F_NO_PREALLOC);

/* nodeport_addrs4/6: the node's addresses NodePorts answer on (--nodeport-addresses; by default every local
 * address, as kube-proxy's iptables mode). NodePort frontends are keyed by the wildcard address (0.0.0.0, ::): a
 * lookup that misses on a destination found here tries the wildcard, so a node address coming or going rewrites
 * one entry, not one per NodePort. The value holds KPR_NODEPORT_F_* flags. */
#define KPR_NODEPORT_F_LOOPBACK 0x01 /* served to the host's own sockets only (kube-proxy's localhost NodePorts) */
struct nodeport_addr6 {
	__be32 addr[4];
};
BPF_TABLE_PINNED("hash", __be32, __u8, nodeport_addrs4, KPR_NODEPORT_ADDRS_MAX, KPR_PIN("nodeport_addrs4", 1),
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct nodeport_addr6, __u8, nodeport_addrs6, KPR_NODEPORT_ADDRS_MAX,
		 KPR_PIN("nodeport_addrs6", 1), BPF_F_NO_PREALLOC);

/* config (one entry): what the agent tells the datapath. With socket_lb HOSTNS_ONLY the socket hooks translate only
 * sockets of the host's network namespace; pods are then served per packet at their veth (CNI chaining).
 * cluster_cidr4/6 (prefix 0: not set) is kube-proxy's detect-local ClusterCIDR: sources inside are the cluster's pods,
 * which an externalTrafficPolicy=Local frontend serves from every endpoint (its internal scope) at tc too. */
#define KPR_SOCKET_LB_FULL 0
#define KPR_SOCKET_LB_HOSTNS_ONLY 1
#define KPR_CONFIG_F_EXTERNAL_CLUSTER_IP 0x01 /* tc serves ClusterIPs to packets arriving on node devices */
struct kpr_config {
	__u64 host_netns_cookie;
	__u32 socket_lb; /* KPR_SOCKET_LB_* */
	__u32 flags;     /* KPR_CONFIG_F_* */
	__be32 cluster_cidr4;
	__be32 cluster_cidr6[4];
	__u8 cluster_prefix4;
	__u8 cluster_prefix6;
	__u8 pad[2];
};
BPF_TABLE_PINNED("array", __u32, struct kpr_config, config, 1, KPR_PIN("config", 1));

/* crc32c_powers: x^(8 i) and x^(8 * 256 i) modulo the CRC32c polynomial (i < 256, bit-reflected), filled by the loader
 * (kpr/datapath/crc32c.py) before any program runs: tc.c folds an SCTP port rewrite into the packet's CRC32c with
 * them, without reading the packet. */
#define KPR_CRC32C_POWERS 512
BPF_TABLE_PINNED("array", __u32, __u32, crc32c_powers, KPR_CRC32C_POWERS, KPR_PIN("crc32c_powers", 1));

/* tc_tails: the tc path's tail calls. Building a reject reply, or translating an ICMP error, needs more stack than
 * fits beside the forwarding path, so each runs as a program of its own. Pinned because the kernel empties a program
 * array when its last user-space reference goes (the loader exits); a missing reject entry makes the caller drop,
 * a missing ICMP one leaves the error untranslated. */
#define KPR_TAIL_REJECT4 0
#define KPR_TAIL_REJECT6 1
#define KPR_TAIL_ICMP4_IN 2
#define KPR_TAIL_ICMP6_IN 3
#define KPR_TAIL_ICMP4_OUT 4
#define KPR_TAIL_ICMP6_OUT 5
#define KPR_TAIL_TOOBIG4 6
#define KPR_TAIL_TOOBIG6 7
#define KPR_TAILS_MAX 8
BPF_TABLE_PINNED("prog", __u32, __u32, tc_tails, KPR_TAILS_MAX, KPR_PIN("tc_tails", 1));

#endif /* KPR_H */
