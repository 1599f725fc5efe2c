/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * sock.c - socket-level load balancing at the cgroup v2 sock_addr hooks.
 *
 * connect and unconnected sendmsg rewrite a frontend destination to a chosen backend before any packet exists, so
 * there is no per-packet NAT; recvmsg and getpeername translate the backend back, so the application sees the address
 * it dialled. The hooks are thin: the frontend and backend choice is lb.h's (shared with tc.c), and the socket's side
 * of it lives in the __always_inline cores below, shared by v4, v6 and the v4-mapped v6 case.
 */
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

/* What a sock_addr hook returns: go on with the (maybe rewritten) call, or fail it with the errno bpf_set_retval set. */
#define SYS_REJECT 0
#define SYS_PROCEED 1

/* What a forward translation decided. */
#define XLATE_PASS 0   /* not a frontend: leave the socket alone */
#define XLATE_DONE 1   /* destination rewritten to a backend */
#define XLATE_REJECT 2 /* no usable backend (or inconsistent maps): fail fast with ECONNREFUSED */
#define XLATE_DROP 3   /* Local policy with endpoints elsewhere only: fail with EHOSTUNREACH */
#define XLATE_DENY 4   /* a source outside loadBalancerSourceRanges (or not known): fail with EPERM */

/* Which hook a shared core runs in: what the context lets it read differs (msg_src_ip4/6 only in the sendmsg hooks). */
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

/* The client behind a socket, as the hook's entry finds it: its network namespace and, in the sendmsg hooks, the source
 * address sendmsg() names (IP_PKTINFO; the context gives it only there, and only field by field; zero when none). */
struct sock_client {
	__u64 netns_cookie;
	bool host; /* a socket of the host's own network namespace */
	__be32 msg_src4;
	__be32 msg_src6[4];
};

/* Fill in *client; false when socket LB does not apply to this socket: with --socket-lb=hostns-only, sockets of other
 * namespaces (chained pods) are left to the per-packet path. */
static __always_inline bool sock_client_init(struct bpf_sock_addr *ctx, struct sock_client *client)
{
	struct kpr_config *cfg = lb_config();

	client->netns_cookie = bpf_get_netns_cookie(ctx);
	client->host = cfg && client->netns_cookie == cfg->host_netns_cookie;
	return !cfg || cfg->socket_lb != KPR_SOCKET_LB_HOSTNS_ONLY || client->host;
}

/* ::ffff:a.b.c.d, a dual-stack socket dialling an IPv4 frontend. */
static __always_inline bool is_v4_mapped(const __u32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

static __always_inline bool zero6(const __be32 *addr)
{
	return !(addr[0] | addr[1] | addr[2] | addr[3]);
}

/* At the socket, the client in the affinity map is its network namespace. */
static __always_inline void sock_affinity_client(struct affinity_key *akey, const struct sock_client *client)
{
	__builtin_memcpy(akey->client, &client->netns_cookie, sizeof(client->netns_cookie));
	akey->kind = KPR_AFFINITY_NETNS;
}

/* A frontend without a backend in this scope: refused, or, with endpoints on other nodes only (Local), unreachable. */
static __always_inline int sock_empty_verdict(__u8 flags)
{
	if (flags & KPR_SVC_F_EMPTY_DROP) {
		counter_inc(KPR_CNT_DROP_NO_LOCAL_BACKEND);
		return XLATE_DROP;
	}
	counter_inc(KPR_CNT_REJECT_NO_BACKEND);
	return XLATE_REJECT;
}

/* loadBalancerSourceRanges for clients on the node, as kube-proxy's firewall chain applies them to every source: the
 * source must be known (else it is refused too) and in the frontend's allowed prefixes. */
static __always_inline bool sock_src_verdict(bool known, bool allowed)
{
	if (!known)
		counter_inc(KPR_CNT_SOURCE_UNKNOWN);
	else if (!allowed)
		counter_inc(KPR_CNT_REJECT_SOURCE_RANGE);
	return known && allowed;
}

/* The address this socket's packets will leave with: the one sendmsg names, its bound one, else its network
 * namespace's primary address (a pod has one; the host's is the node IP), which the agent keeps in netns_addrs.
 * 0: not known yet. */
static __always_inline __be32 sock4_source(struct bpf_sock_addr *ctx, const struct sock_client *client)
{
	struct bpf_sock *sk = ctx->sk;
	struct device_info *addrs;
	__u64 cookie = client->netns_cookie;

	if (client->msg_src4)
		return client->msg_src4;
	if (sk && sk->src_ip4)
		return sk->src_ip4;
	addrs = netns_addrs.lookup(&cookie);
	return addrs ? addrs->addr4 : 0;
}

static __always_inline bool sock6_source(struct bpf_sock_addr *ctx, const struct sock_client *client, __be32 *src)
{
	struct bpf_sock *sk = ctx->sk;
	struct device_info *addrs;
	__u64 cookie = client->netns_cookie;

	if (!zero6(client->msg_src6)) {
		__builtin_memcpy(src, client->msg_src6, 16);
		return true;
	}
	if (sk) {
		src[0] = sk->src_ip6[0];
		src[1] = sk->src_ip6[1];
		src[2] = sk->src_ip6[2];
		src[3] = sk->src_ip6[3];
		if (!zero6(src))
			return true;
	}
	addrs = netns_addrs.lookup(&cookie);
	if (!addrs || zero6(addrs->addr6))
		return false;
	__builtin_memcpy(src, addrs->addr6, 16);
	return true;
}

static __always_inline bool sock4_allowed(struct bpf_sock_addr *ctx, const struct sock_client *client, __u32 rev_nat_id)
{
	__be32 src = sock4_source(ctx, client);

	return sock_src_verdict(src != 0, src && lb4_src_allowed(rev_nat_id, src));
}

static __always_inline bool sock6_allowed(struct bpf_sock_addr *ctx, const struct sock_client *client, __u32 rev_nat_id)
{
	__be32 src[4] = {};
	bool known = sock6_source(ctx, client, src);

	return sock_src_verdict(known, known && lb6_src_allowed(rev_nat_id, src));
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

/* Forward translation, IPv4: rewrite *dst from a frontend to a backend. A socket is an in-cluster client: the internal
 * scope when the frontend has two. */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx, struct dest4 *dst,
					   const struct sock_client *client)
{
	struct svc_key4 key = {};
	struct affinity_key akey = {};
	struct svc_value *svc;
	struct backend4 *backend;
	__u32 backend_id;

	key.addr = dst->addr;
	key.port = dst->port;
	key.proto = ctx->protocol;
	svc = lb4_lookup_frontend(&key, client->host);
	if (!svc)
		return XLATE_PASS;
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !sock4_allowed(ctx, client, svc->rev_nat_id))
		return XLATE_DENY;
	svc = lb4_select_scope(&key, svc, true);
	if (!svc->count)
		return sock_empty_verdict(svc->flags);
	sock_affinity_client(&akey, client);
	backend = lb4_select_backend(&key, svc, &akey, &backend_id);
	if (!backend)
		return XLATE_REJECT;
	sock4_record_rev(ctx, backend, dst, svc->rev_nat_id);
	dst->addr = backend->addr;
	dst->port = backend->port;
	counter_inc(KPR_CNT_XLATE_FWD);
	return XLATE_DONE;
}

static __always_inline int sock6_xlate_fwd(struct bpf_sock_addr *ctx, struct dest6 *dst,
					   const struct sock_client *client)
{
	struct svc_key6 key = {};
	struct affinity_key akey = {};
	struct svc_value *svc;
	struct backend6 *backend;
	__u32 backend_id;

	__builtin_memcpy(key.addr, dst->addr, sizeof(key.addr));
	key.port = dst->port;
	key.proto = ctx->protocol;
	svc = lb6_lookup_frontend(&key, client->host);
	if (!svc)
		return XLATE_PASS;
	if ((svc->flags & KPR_SVC_F_SOURCE_RANGES) && !sock6_allowed(ctx, client, svc->rev_nat_id))
		return XLATE_DENY;
	svc = lb6_select_scope(&key, svc, true);
	if (!svc->count)
		return sock_empty_verdict(svc->flags);
	sock_affinity_client(&akey, client);
	backend = lb6_select_backend(&key, svc, &akey, &backend_id);
	if (!backend)
		return XLATE_REJECT;
	sock6_record_rev(ctx, backend, dst, svc->rev_nat_id);
	__builtin_memcpy(dst->addr, backend->addr, sizeof(dst->addr));
	dst->port = backend->port;
	counter_inc(KPR_CNT_XLATE_FWD);
	return XLATE_DONE;
}

/* Whether a recorded reverse translation still holds: its frontend (rev_nat_id) is still there on the port the socket
 * dialled. A stale one (the frontend is gone or now means something else) is counted: the caller shows the truth. */
static __always_inline bool sock_rev_current(bool holds)
{
	if (!holds)
		counter_inc(KPR_CNT_REV_NAT_STALE);
	return holds;
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
	if (!sock_rev_current(frontend && (!frontend->addr || frontend->addr == seen->addr) &&
			      frontend->port == seen->port)) {
		sock_rev_nat4.delete(&key);
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
	if (!sock_rev_current(frontend && frontend->port == seen->port &&
			      (zero6(frontend->addr) ||
			       (frontend->addr[0] == seen->addr[0] && frontend->addr[1] == seen->addr[1] &&
				frontend->addr[2] == seen->addr[2] && frontend->addr[3] == seen->addr[3])))) {
		sock_rev_nat6.delete(&key);
		return false;
	}
	__builtin_memcpy(src->addr, seen->addr, sizeof(src->addr));
	src->port = seen->port;
	counter_inc(KPR_CNT_XLATE_REV);
	return true;
}

/* Map a forward verdict to the hook's return value; a refused connect or sendmsg fails with a clear errno. */
static __always_inline int sock_verdict(int xlate)
{
	switch (xlate) {
	case XLATE_REJECT:
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	case XLATE_DROP:
		bpf_set_retval(-EHOSTUNREACH);
		return SYS_REJECT;
	case XLATE_DENY:
		bpf_set_retval(-EPERM);
		return SYS_REJECT;
	default:
		return SYS_PROCEED;
	}
}

static __always_inline int sock4_fwd(struct bpf_sock_addr *ctx, int hook)
{
	struct dest4 dst = { .addr = ctx->user_ip4, .port = (__be16)ctx->user_port };
	struct sock_client client = {};
	int xlate;

	if (!sock_client_init(ctx, &client))
		return SYS_PROCEED;
	if (hook == HOOK_SENDMSG4)
		client.msg_src4 = ctx->msg_src_ip4;
	xlate = sock4_xlate_fwd(ctx, &dst, &client);
	if (xlate == XLATE_DONE) {
		/* Rewrite the destination to the chosen backend before the SYN (or datagram) exists. */
		ctx->user_ip4 = dst.addr;
		ctx->user_port = dst.port;
	}
	return sock_verdict(xlate);
}

static __always_inline int sock6_fwd(struct bpf_sock_addr *ctx, int hook)
{
	__u32 addr[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct sock_client client = {};
	int xlate;

	if (!sock_client_init(ctx, &client))
		return SYS_PROCEED;
	if (hook == HOOK_SENDMSG6) {
		client.msg_src6[0] = ctx->msg_src_ip6[0];
		client.msg_src6[1] = ctx->msg_src_ip6[1];
		client.msg_src6[2] = ctx->msg_src_ip6[2];
		client.msg_src6[3] = ctx->msg_src_ip6[3];
		if (is_v4_mapped(client.msg_src6)) /* a dual-stack socket naming an IPv4 source */
			client.msg_src4 = client.msg_src6[3];
	}
	if (is_v4_mapped(addr)) {
		struct dest4 dst4 = { .addr = addr[3], .port = (__be16)ctx->user_port };

		xlate = sock4_xlate_fwd(ctx, &dst4, &client);
		if (xlate == XLATE_DONE) {
			ctx->user_ip6[3] = dst4.addr;
			ctx->user_port = dst4.port;
		}
		return sock_verdict(xlate);
	}

	struct dest6 dst = { .port = (__be16)ctx->user_port };

	__builtin_memcpy(dst.addr, addr, sizeof(dst.addr));
	xlate = sock6_xlate_fwd(ctx, &dst, &client);
	if (xlate == XLATE_DONE) {
		ctx->user_ip6[0] = dst.addr[0];
		ctx->user_ip6[1] = dst.addr[1];
		ctx->user_ip6[2] = dst.addr[2];
		ctx->user_ip6[3] = dst.addr[3];
		ctx->user_port = dst.port;
	}
	return sock_verdict(xlate);
}

static __always_inline int sock4_rev(struct bpf_sock_addr *ctx)
{
	struct dest4 src = { .addr = ctx->user_ip4, .port = (__be16)ctx->user_port };

	if (sock4_xlate_rev(ctx, &src)) {
		ctx->user_ip4 = src.addr;
		ctx->user_port = src.port;
	}
	return SYS_PROCEED;
}

static __always_inline int sock6_rev(struct bpf_sock_addr *ctx)
{
	__u32 addr[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };

	if (is_v4_mapped(addr)) {
		struct dest4 src4 = { .addr = addr[3], .port = (__be16)ctx->user_port };

		if (sock4_xlate_rev(ctx, &src4)) {
			ctx->user_ip6[3] = src4.addr;
			ctx->user_port = src4.port;
		}
		return SYS_PROCEED;
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
	return SYS_PROCEED;
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
	return sock4_rev(ctx);
}

int kpr_peername4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx);
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
	return sock6_rev(ctx);
}

int kpr_peername6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx);
}
