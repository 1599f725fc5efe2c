/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sock.c - socket-level load balancing at the cgroup v2 sock_addr hooks.
 *
 * connect and unconnected sendmsg rewrite a frontend destination to a chosen backend before any packet exists, so
 * there is no per-packet NAT; recvmsg and getpeername translate the backend back, so the application sees the address
 * it dialled. The hooks are thin: the logic lives in the __always_inline cores below, shared by v4, v6 and the
 * v4-mapped v6 case.
 */
#include "kpr.h"

#define KPR_NSEC_PER_SEC 1000000000ULL

/* What a forward translation decided. */
#define XLATE_PASS 0   /* not a frontend: leave the socket alone */
#define XLATE_DONE 1   /* destination rewritten to a backend */
#define XLATE_REJECT 2 /* no usable backend (or inconsistent maps): fail fast with ECONNREFUSED */
#define XLATE_DROP 3   /* Local policy with endpoints elsewhere only: fail with EHOSTUNREACH */
#define XLATE_DENY 4   /* a source outside loadBalancerSourceRanges (or not known): fail with EPERM */

/* Which hook a shared core runs in: what the context lets it read differs (msg_src_ip4 only in sendmsg4). */
#define HOOK_CONNECT 0
#define HOOK_SENDMSG4 1
#define HOOK_SENDMSG6 2

struct dest4 {
	__be32 addr;
	__be16 port;
};

struct dest6 {
	__be32 addr[4];
	__be16 port;
};

static __always_inline void counter_inc(__u32 idx)
{
	__u64 *value = counters.lookup(&idx);

	if (value)
		*value += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline int empty_verdict(__u8 flags)
{
	if (flags & KPR_SVC_F_EMPTY_DROP) {
		counter_inc(KPR_CNT_DROP_NO_LOCAL_BACKEND);
		return XLATE_DROP;
	}
	counter_inc(KPR_CNT_REJECT_NO_BACKEND);
	return XLATE_REJECT;
}

/* ClientIP affinity: the backend this client used within the timeout, if it still serves the frontend. */
static __always_inline __u32 affinity_lookup(struct affinity_key *key, __u32 timeout_s, __u64 now)
{
	struct affinity_value *seen = affinity.lookup(key);
	struct affinity_match_key match = {};

	if (!seen)
		return 0;
	if (now - seen->last_used_ns > (__u64)timeout_s * KPR_NSEC_PER_SEC)
		return 0;
	match.backend_id = seen->backend_id;
	match.rev_nat_id = key->rev_nat_id;
	if (!affinity_match.lookup(&match))
		return 0;
	return seen->backend_id;
}

static __always_inline void affinity_store(struct affinity_key *key, __u32 backend_id, __u64 now)
{
	struct affinity_value value = {};

	value.last_used_ns = now;
	value.backend_id = backend_id;
	affinity.update(key, &value);
}

static __always_inline void affinity_key_for_socket(struct affinity_key *key, void *ctx, __u32 rev_nat_id)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);

	__builtin_memcpy(key->client, &cookie, sizeof(cookie));
	key->rev_nat_id = rev_nat_id;
	key->kind = KPR_AFFINITY_NETNS;
}

/* Affinity first: the backend this client keeps while the frontend's timeout has not passed (0: none). */
static __always_inline __u32 affinity_begin(void *ctx, const struct svc_value *svc, struct affinity_key *akey,
					    __u64 *now)
{
	__u32 backend_id;

	if (!(svc->flags & KPR_SVC_F_AFFINITY))
		return 0;
	*now = bpf_ktime_get_ns();
	affinity_key_for_socket(akey, ctx, svc->rev_nat_id);
	backend_id = affinity_lookup(akey, svc->affinity_timeout, *now);
	counter_inc(backend_id ? KPR_CNT_AFFINITY_HIT : KPR_CNT_AFFINITY_NEW);
	return backend_id;
}

/* Refresh the client's affinity on every use, as kube-proxy's `recent --set` does. */
static __always_inline void affinity_end(const struct svc_value *svc, struct affinity_key *akey, __u32 backend_id,
					 __u64 now)
{
	if (svc->flags & KPR_SVC_F_AFFINITY)
		affinity_store(akey, backend_id, now);
}

/* A random slot of the master entry at *key; the key's slot field is reused for the lookup. */
static __always_inline __u32 svc4_slot_backend(struct svc_key4 *key, __u16 slots)
{
	struct svc_value *slot;

	key->slot = (bpf_get_prandom_u32() % slots) + 1;
	slot = services4.lookup(key);
	if (!slot) {
		counter_inc(KPR_CNT_ERR_SLOT_MISSING);
		return 0;
	}
	return slot->backend_id;
}

static __always_inline __u32 svc6_slot_backend(struct svc_key6 *key, __u16 slots)
{
	struct svc_value *slot;

	key->slot = (bpf_get_prandom_u32() % slots) + 1;
	slot = services6.lookup(key);
	if (!slot) {
		counter_inc(KPR_CNT_ERR_SLOT_MISSING);
		return 0;
	}
	return slot->backend_id;
}

/* Whether a socket belongs to the host's own network namespace (written by the agent into config). */
static __always_inline bool in_host_netns(void *ctx)
{
	__u32 zero = 0;
	struct kpr_config *cfg = config.lookup(&zero);

	return cfg && bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie;
}

/* The frontend a socket dials: the exact entry, else, for a node address NodePorts answer on, the NodePort's
 * wildcard entry (*key is changed to it). A loopback NodePort address counts for the host's own sockets only, as
 * kube-proxy's localhost NodePorts: a pod's 127.0.0.1 is its own. */
static __always_inline struct svc_value *svc4_frontend(void *ctx, struct svc_key4 *key)
{
	struct svc_value *svc = services4.lookup(key);
	__u8 *np;

	if (svc)
		return svc;
	np = nodeport_addrs4.lookup(&key->addr);
	if (!np || ((*np & KPR_NODEPORT_F_LOOPBACK) && !in_host_netns(ctx)))
		return NULL;
	key->addr = 0;
	return services4.lookup(key);
}

static __always_inline struct svc_value *svc6_frontend(void *ctx, struct svc_key6 *key)
{
	struct svc_value *svc = services6.lookup(key);
	__u8 *np;

	if (svc)
		return svc;
	np = nodeport_addrs6.lookup((struct nodeport_addr6 *)key->addr);
	if (!np || ((*np & KPR_NODEPORT_F_LOOPBACK) && !in_host_netns(ctx)))
		return NULL;
	__builtin_memset(key->addr, 0, sizeof(key->addr));
	return services6.lookup(key);
}

/* The master entry for in-cluster traffic: the internal scope when the frontend has two. */
static __always_inline struct svc_value *svc4_in_cluster(struct svc_key4 *key, struct svc_value *svc)
{
	if (svc->flags & KPR_SVC_F_TWO_SCOPES) {
		struct svc_value *internal;

		key->scope = KPR_SCOPE_INTERNAL;
		internal = services4.lookup(key);
		if (internal)
			return internal;
		counter_inc(KPR_CNT_ERR_SCOPE_MISSING);
		key->scope = KPR_SCOPE_DEFAULT;
	}
	return svc;
}

static __always_inline struct svc_value *svc6_in_cluster(struct svc_key6 *key, struct svc_value *svc)
{
	if (svc->flags & KPR_SVC_F_TWO_SCOPES) {
		struct svc_value *internal;

		key->scope = KPR_SCOPE_INTERNAL;
		internal = services6.lookup(key);
		if (internal)
			return internal;
		counter_inc(KPR_CNT_ERR_SCOPE_MISSING);
		key->scope = KPR_SCOPE_DEFAULT;
	}
	return svc;
}

/* ::ffff:a.b.c.d, a dual-stack socket dialling an IPv4 frontend. */
static __always_inline bool is_v4_mapped(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

/* A source address sendmsg() names (IP_PKTINFO), read by the hook's entry where the context allows it (only the
 * sendmsg hooks may read msg_src_ip4/6, and only field by field); zero when none. */
struct msg_src {
	__be32 v4;
	__be32 v6[4];
};

/* The address this socket's packets will leave with: the one sendmsg names, its bound one, else its network
 * namespace's primary address (a pod has one; the host's is the node IP), which the agent keeps in netns_addrs.
 * 0: not known yet. */
static __always_inline __be32 sock4_source(struct bpf_sock_addr *ctx, const struct msg_src *msg)
{
	struct bpf_sock *sk = ctx->sk;
	struct device_info *addrs;
	__u64 cookie;

	if (msg->v4)
		return msg->v4;
	if (sk && sk->src_ip4)
		return sk->src_ip4;
	cookie = bpf_get_netns_cookie(ctx);
	addrs = netns_addrs.lookup(&cookie);
	return addrs ? addrs->addr4 : 0;
}

static __always_inline bool sock6_source(struct bpf_sock_addr *ctx, const struct msg_src *msg, __be32 *src)
{
	struct bpf_sock *sk = ctx->sk;
	struct device_info *addrs;
	__u64 cookie;

	if (msg->v6[0] | msg->v6[1] | msg->v6[2] | msg->v6[3]) {
		__builtin_memcpy(src, msg->v6, 16);
		return true;
	}
	if (sk) {
		src[0] = sk->src_ip6[0];
		src[1] = sk->src_ip6[1];
		src[2] = sk->src_ip6[2];
		src[3] = sk->src_ip6[3];
		if (src[0] | src[1] | src[2] | src[3])
			return true;
	}
	cookie = bpf_get_netns_cookie(ctx);
	addrs = netns_addrs.lookup(&cookie);
	if (!addrs || !(addrs->addr6[0] | addrs->addr6[1] | addrs->addr6[2] | addrs->addr6[3]))
		return false;
	__builtin_memcpy(src, addrs->addr6, 16);
	return true;
}

/* loadBalancerSourceRanges for clients on the node, as kube-proxy's firewall chain applies them to every source:
 * the source must be in the frontend's allowed prefixes (src_ranges4/6). A source kpr cannot tell is refused too. */
static __always_inline bool sock4_allowed(struct bpf_sock_addr *ctx, const struct msg_src *msg, __u32 rev_nat_id)
{
	struct src_range_key4 key = {};

	key.addr = sock4_source(ctx, msg);
	if (!key.addr) {
		counter_inc(KPR_CNT_SOURCE_UNKNOWN);
		return false;
	}
	key.prefixlen = 64;
	key.rev_nat_id = bpf_htonl(rev_nat_id);
	if (src_ranges4.lookup(&key))
		return true;
	counter_inc(KPR_CNT_REJECT_SOURCE_RANGE);
	return false;
}

static __always_inline bool sock6_allowed(struct bpf_sock_addr *ctx, const struct msg_src *msg, __u32 rev_nat_id)
{
	struct src_range_key6 key = {};

	if (!sock6_source(ctx, msg, key.addr)) {
		counter_inc(KPR_CNT_SOURCE_UNKNOWN);
		return false;
	}
	key.prefixlen = 160;
	key.rev_nat_id = bpf_htonl(rev_nat_id);
	if (src_ranges6.lookup(&key))
		return true;
	counter_inc(KPR_CNT_REJECT_SOURCE_RANGE);
	return false;
}

/* Remember {socket, backend} -> frontend so recvmsg/getpeername can show the frontend again. */
static __always_inline void sock4_record_rev(void *ctx, const struct backend4 *backend, const struct dest4 *frontend,
					     __u32 rev_nat_id)
{
	struct sock_rev_nat_key4 key = {};
	struct sock_rev_nat4 value = {};

	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = backend->addr;
	key.port = backend->port;
	value.addr = frontend->addr;
	value.port = frontend->port;
	value.rev_nat_id = rev_nat_id;
	if (sock_rev_nat4.update(&key, &value))
		counter_inc(KPR_CNT_ERR_SOCK_REV_NAT);
}

static __always_inline void sock6_record_rev(void *ctx, const struct backend6 *backend, const struct dest6 *frontend,
					     __u32 rev_nat_id)
{
	struct sock_rev_nat_key6 key = {};
	struct sock_rev_nat6 value = {};

	key.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(key.addr, backend->addr, sizeof(key.addr));
	key.port = backend->port;
	__builtin_memcpy(value.addr, frontend->addr, sizeof(value.addr));
	value.port = frontend->port;
	value.rev_nat_id = rev_nat_id;
	if (sock_rev_nat6.update(&key, &value))
		counter_inc(KPR_CNT_ERR_SOCK_REV_NAT);
}

/* Forward translation, IPv4: rewrite *dst from a frontend to a backend. */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx, struct dest4 *dst, __u8 proto,
					   const struct msg_src *msg)
{
	struct svc_key4 key = {};
	struct affinity_key akey = {};
	struct svc_value *svc;
	struct backend4 *backend;
	__u32 backend_id;
	__u16 slots;
	__u64 now = 0;

	key.addr = dst->addr;
	key.port = dst->port;
	key.proto = proto;
	svc = svc4_frontend(ctx, &key);
	if (!svc)
		return XLATE_PASS;
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !sock4_allowed(ctx, msg, svc->rev_nat_id))
		return XLATE_DENY;
	svc = svc4_in_cluster(&key, svc);
	slots = svc->count;
	if (!slots)
		return empty_verdict(svc->flags);

	backend_id = affinity_begin(ctx, svc, &akey, &now);
	if (!backend_id)
		backend_id = svc4_slot_backend(&key, slots);
	if (!backend_id)
		return XLATE_REJECT;
	backend = backends4.lookup(&backend_id);
	if (!backend) {
		counter_inc(KPR_CNT_ERR_BACKEND_MISSING);
		return XLATE_REJECT;
	}
	affinity_end(svc, &akey, backend_id, now);

	sock4_record_rev(ctx, backend, dst, svc->rev_nat_id);
	dst->addr = backend->addr;
	dst->port = backend->port;
	counter_inc(KPR_CNT_XLATE_FWD);
	return XLATE_DONE;
}

static __always_inline int sock6_xlate_fwd(struct bpf_sock_addr *ctx, struct dest6 *dst, __u8 proto,
					   const struct msg_src *msg)
{
	struct svc_key6 key = {};
	struct affinity_key akey = {};
	struct svc_value *svc;
	struct backend6 *backend;
	__u32 backend_id;
	__u16 slots;
	__u64 now = 0;

	__builtin_memcpy(key.addr, dst->addr, sizeof(key.addr));
	key.port = dst->port;
	key.proto = proto;
	svc = svc6_frontend(ctx, &key);
	if (!svc)
		return XLATE_PASS;
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !sock6_allowed(ctx, msg, svc->rev_nat_id))
		return XLATE_DENY;
	svc = svc6_in_cluster(&key, svc);
	slots = svc->count;
	if (!slots)
		return empty_verdict(svc->flags);

	backend_id = affinity_begin(ctx, svc, &akey, &now);
	if (!backend_id)
		backend_id = svc6_slot_backend(&key, slots);
	if (!backend_id)
		return XLATE_REJECT;
	backend = backends6.lookup(&backend_id);
	if (!backend) {
		counter_inc(KPR_CNT_ERR_BACKEND_MISSING);
		return XLATE_REJECT;
	}
	affinity_end(svc, &akey, backend_id, now);

	sock6_record_rev(ctx, backend, dst, svc->rev_nat_id);
	__builtin_memcpy(dst->addr, backend->addr, sizeof(dst->addr));
	dst->port = backend->port;
	counter_inc(KPR_CNT_XLATE_FWD);
	return XLATE_DONE;
}

/* Reverse translation: if this socket was sent to *src as a backend of a frontend, show the frontend. */
static __always_inline bool sock4_xlate_rev(void *ctx, struct dest4 *src)
{
	struct sock_rev_nat_key4 key = {};
	struct sock_rev_nat4 *seen;
	struct rev_nat4 *frontend;

	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = src->addr;
	key.port = src->port;
	seen = sock_rev_nat4.lookup(&key);
	if (!seen)
		return false;
	frontend = rev_nat4.lookup(&seen->rev_nat_id);
	/* (a NodePort's frontend is the wildcard address: the socket recorded the node address it dialled) */
	if (!frontend || (frontend->addr && frontend->addr != seen->addr) || frontend->port != seen->port) {
		/* The frontend is gone or now means something else: show the truth, not a stale address. */
		sock_rev_nat4.delete(&key);
		counter_inc(KPR_CNT_REV_NAT_STALE);
		return false;
	}
	src->addr = seen->addr;
	src->port = seen->port;
	counter_inc(KPR_CNT_XLATE_REV);
	return true;
}

static __always_inline bool sock6_xlate_rev(void *ctx, struct dest6 *src)
{
	struct sock_rev_nat_key6 key = {};
	struct sock_rev_nat6 *seen;
	struct rev_nat6 *frontend;

	key.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(key.addr, src->addr, sizeof(key.addr));
	key.port = src->port;
	seen = sock_rev_nat6.lookup(&key);
	if (!seen)
		return false;
	frontend = rev_nat6.lookup(&seen->rev_nat_id);
	if (!frontend || frontend->port != seen->port ||
	    ((frontend->addr[0] | frontend->addr[1] | frontend->addr[2] | frontend->addr[3]) &&
	     (frontend->addr[0] != seen->addr[0] || frontend->addr[1] != seen->addr[1] ||
	      frontend->addr[2] != seen->addr[2] || frontend->addr[3] != seen->addr[3]))) {
		sock_rev_nat6.delete(&key);
		counter_inc(KPR_CNT_REV_NAT_STALE);
		return false;
	}
	__builtin_memcpy(src->addr, seen->addr, sizeof(src->addr));
	src->port = seen->port;
	counter_inc(KPR_CNT_XLATE_REV);
	return true;
}

/* Map a forward verdict to the hook's return value; a rejected connect or sendmsg fails with a clear errno. */
static __always_inline int verdict(int xlate)
{
	if (xlate == XLATE_REJECT) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	if (xlate == XLATE_DROP) {
		bpf_set_retval(-EHOSTUNREACH);
		return 0;
	}
	if (xlate == XLATE_DENY) {
		bpf_set_retval(-EPERM);
		return 0;
	}
	return 1;
}


/* With --socket-lb=hostns-only, sockets of other namespaces (chained pods) are left to the per-packet path. */
static __always_inline bool socket_lb_applies(void *ctx)
{
	__u32 zero = 0;
	struct kpr_config *cfg = config.lookup(&zero);

	if (!cfg || cfg->socket_lb != KPR_SOCKET_LB_HOSTNS_ONLY)
		return true;
	return bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie;
}

static __always_inline int sock4_fwd(struct bpf_sock_addr *ctx, int hook)
{
	struct dest4 dst = { .addr = ctx->user_ip4, .port = (__be16)ctx->user_port };
	struct msg_src msg = {};
	int xlate;

	if (!socket_lb_applies(ctx))
		return 1;
	if (hook == HOOK_SENDMSG4)
		msg.v4 = ctx->msg_src_ip4;
	xlate = sock4_xlate_fwd(ctx, &dst, ctx->protocol, &msg);

	if (xlate == XLATE_DONE) {
		/* Rewrite the destination to the chosen backend before the SYN (or datagram) exists. */
		ctx->user_ip4 = dst.addr;
		ctx->user_port = dst.port;
	}
	return verdict(xlate);
}

static __always_inline int sock6_fwd(struct bpf_sock_addr *ctx, int hook)
{
	__u32 addr[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct msg_src msg = {};
	int xlate;

	if (!socket_lb_applies(ctx))
		return 1;
	if (hook == HOOK_SENDMSG6) {
		msg.v6[0] = ctx->msg_src_ip6[0];
		msg.v6[1] = ctx->msg_src_ip6[1];
		msg.v6[2] = ctx->msg_src_ip6[2];
		msg.v6[3] = ctx->msg_src_ip6[3];
		if (is_v4_mapped(msg.v6)) /* a dual-stack socket naming an IPv4 source */
			msg.v4 = msg.v6[3];
	}
	if (is_v4_mapped(addr)) {
		struct dest4 dst4 = { .addr = addr[3], .port = (__be16)ctx->user_port };

		xlate = sock4_xlate_fwd(ctx, &dst4, ctx->protocol, &msg);
		if (xlate == XLATE_DONE) {
			ctx->user_ip6[3] = dst4.addr;
			ctx->user_port = dst4.port;
		}
		return verdict(xlate);
	}

	struct dest6 dst = { .port = (__be16)ctx->user_port };

	__builtin_memcpy(dst.addr, addr, sizeof(dst.addr));
	xlate = sock6_xlate_fwd(ctx, &dst, ctx->protocol, &msg);
	if (xlate == XLATE_DONE) {
		ctx->user_ip6[0] = dst.addr[0];
		ctx->user_ip6[1] = dst.addr[1];
		ctx->user_ip6[2] = dst.addr[2];
		ctx->user_ip6[3] = dst.addr[3];
		ctx->user_port = dst.port;
	}
	return verdict(xlate);
}

static __always_inline void sock4_rev(struct bpf_sock_addr *ctx)
{
	struct dest4 src = { .addr = ctx->user_ip4, .port = (__be16)ctx->user_port };

	if (sock4_xlate_rev(ctx, &src)) {
		ctx->user_ip4 = src.addr;
		ctx->user_port = src.port;
	}
}

static __always_inline void sock6_rev(struct bpf_sock_addr *ctx)
{
	__u32 addr[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };

	if (is_v4_mapped(addr)) {
		struct dest4 src4 = { .addr = addr[3], .port = (__be16)ctx->user_port };

		if (sock4_xlate_rev(ctx, &src4)) {
			ctx->user_ip6[3] = src4.addr;
			ctx->user_port = src4.port;
		}
		return;
	}

	struct dest6 src = { .port = (__be16)ctx->user_port };

	__builtin_memcpy(src.addr, addr, sizeof(src.addr));
	if (sock6_xlate_rev(ctx, &src)) {
		ctx->user_ip6[0] = src.addr[0];
		ctx->user_ip6[1] = src.addr[1];
		ctx->user_ip6[2] = src.addr[2];
		ctx->user_ip6[3] = src.addr[3];
		ctx->user_port = src.port;
	}
}

/* The hooks. Names start with kpr_ so `kpr cleanup` and `kpr status` recognise them (15 characters at most). */

int kpr_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx, HOOK_CONNECT);
}

int kpr_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx, HOOK_SENDMSG4);
}

int kpr_recvmsg4(struct bpf_sock_addr *ctx)
{
	sock4_rev(ctx);
	return 1;
}

int kpr_peername4(struct bpf_sock_addr *ctx)
{
	sock4_rev(ctx);
	return 1;
}

int kpr_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx, HOOK_CONNECT);
}

int kpr_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx, HOOK_SENDMSG6);
}

int kpr_recvmsg6(struct bpf_sock_addr *ctx)
{
	sock6_rev(ctx);
	return 1;
}

int kpr_peername6(struct bpf_sock_addr *ctx)
{
	sock6_rev(ctx);
	return 1;
}
