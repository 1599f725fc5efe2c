/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * lb.h - the load-balancing core that sock.c and tc.c share, shaped after Cilium's bpf/lib/lb.h.
 *
 * A new connection goes from a frontend to a backend in the same steps at the socket and at tc; each program calls them
 * in its own order, with its own verdicts and counters around them:
 *   lb4_lookup_frontend   the frontend's master entry: its exact address, else the NodePort wildcard entry
 *   lb4_src_allowed       loadBalancerSourceRanges
 *   lb4_select_scope      the internal scope for in-cluster clients when the frontend has two
 *   lb4_select_backend    the client's affine backend, else a random slot; the affinity remembered
 * (and their lb6_ twins, which differ only in the address and the maps), and counter_inc for `kpr status`. BCC 0.26 links
 * no BPF-to-BPF calls: every helper is static __always_inline, and what a caller does not use costs it nothing.
 */
#ifndef KPR_LB_H
#define KPR_LB_H

#include "kpr.h"

#ifndef NSEC_PER_SEC /* (the kernel headers BCC includes have it) */
#define NSEC_PER_SEC 1000000000ULL
#endif

/* ---- the map accesses lb.h needs ----
 * BCC 0.26 rewrites a map call (`services4.lookup(key)`) only in the file it compiles, never in a header that file
 * includes: here it would stay a call through an unset pointer, which the kernel refuses ("unknown opcode 8d"). So
 * lb.h declares the accesses it needs and each program defines them, one line each, where BCC rewrites them. */
static __always_inline __u64 *lb_map_counter(__u32 *idx);
static __always_inline struct kpr_config *lb_map_config(__u32 *zero);
static __always_inline struct svc_value *lb_map_service4(struct svc_key4 *key);
static __always_inline struct svc_value *lb_map_service6(struct svc_key6 *key);
static __always_inline __u8 *lb_map_nodeport4(__be32 *addr);
static __always_inline __u8 *lb_map_nodeport6(struct nodeport_addr6 *addr);
static __always_inline __u8 *lb_map_src_range4(struct src_range_key4 *key);
static __always_inline __u8 *lb_map_src_range6(struct src_range_key6 *key);
static __always_inline struct affinity_value *lb_map_affinity(struct affinity_key *key);
static __always_inline void lb_map_affinity_set(struct affinity_key *key, struct affinity_value *value);
static __always_inline __u8 *lb_map_affinity_match(struct affinity_match_key *key);
static __always_inline struct backend4 *lb_map_backend4(__u32 *id);
static __always_inline struct backend6 *lb_map_backend6(__u32 *id);

/* Count an event for `kpr status` (KPR_CNT_*). */
static __always_inline void counter_inc(__u32 idx)
{
	__u64 *value = lb_map_counter(&idx);

	if (value)
		*value += 1; /* per-CPU slot: no atomics needed */
}

/* What the agent tells the datapath (one entry; zero until the agent wrote it). */
static __always_inline struct kpr_config *lb_config(void)
{
	__u32 zero = 0;

	return lb_map_config(&zero);
}

/* ---- services ---- */

/* The master entry (slot 0) of *key's frontend in a scope; *key keeps the scope. */
static __always_inline struct svc_value *lb4_lookup_service(struct svc_key4 *key, __u8 scope)
{
	key->scope = scope;
	key->slot = 0;
	return lb_map_service4(key);
}

static __always_inline struct svc_value *lb6_lookup_service(struct svc_key6 *key, __u8 scope)
{
	key->scope = scope;
	key->slot = 0;
	return lb_map_service6(key);
}

/* Whether a node address NodePorts answer on (np: its KPR_NODEPORT_F_* flags; NULL, not one) serves this client. A
 * loopback one serves the host's own sockets only, as kube-proxy's localhost NodePorts: a pod's 127.0.0.1 is its own,
 * and no packet at tc comes from a host socket. */
static __always_inline bool lb_nodeport_serves(const __u8 *np, bool host_socket)
{
	return np && (!(*np & KPR_NODEPORT_F_LOOPBACK) || host_socket);
}

/* The frontend *key names: its exact entry, else, on a node address NodePorts answer on, the NodePort's entry. NodePorts
 * are keyed by the wildcard address, so *key becomes that entry's key. NULL: not a frontend. */
static __always_inline struct svc_value *lb4_lookup_frontend(struct svc_key4 *key, bool host_socket)
{
	struct svc_value *svc = lb4_lookup_service(key, KPR_SCOPE_DEFAULT);

	if (svc || !lb_nodeport_serves(lb_map_nodeport4(&key->addr), host_socket))
		return svc;
	key->addr = 0;
	return lb_map_service4(key);
}

static __always_inline struct svc_value *lb6_lookup_frontend(struct svc_key6 *key, bool host_socket)
{
	struct svc_value *svc = lb6_lookup_service(key, KPR_SCOPE_DEFAULT);

	if (svc || !lb_nodeport_serves(lb_map_nodeport6((struct nodeport_addr6 *)key->addr), host_socket))
		return svc;
	__builtin_memset(key->addr, 0, sizeof(key->addr));
	return lb_map_service6(key);
}

/* loadBalancerSourceRanges (KPR_SVC_F_SOURCE_RANGES): whether a source is in the frontend's allowed prefixes. */
static __always_inline bool lb4_src_allowed(__u32 rev_nat_id, __be32 saddr)
{
	struct src_range_key4 key = {};

	key.prefixlen = 8 * (sizeof(key.rev_nat_id) + sizeof(key.addr));
	key.rev_nat_id = bpf_htonl(rev_nat_id);
	key.addr = saddr;
	return lb_map_src_range4(&key) != NULL;
}

static __always_inline bool lb6_src_allowed(__u32 rev_nat_id, const __be32 *saddr)
{
	struct src_range_key6 key = {};

	key.prefixlen = 8 * (sizeof(key.rev_nat_id) + sizeof(key.addr));
	key.rev_nat_id = bpf_htonl(rev_nat_id);
	__builtin_memcpy(key.addr, saddr, sizeof(key.addr));
	return lb_map_src_range6(&key) != NULL;
}

/* Which of a frontend's two scopes (KPR_SVC_F_TWO_SCOPES) a client uses: the internal one (`internal`, just looked up)
 * for traffic that starts inside the cluster, else the default one. A missing internal entry (should never happen) is
 * counted and the default one used; *scope says which. */
static __always_inline struct svc_value *lb_scope_found(struct svc_value *svc, struct svc_value *internal, __u8 *scope)
{
	if (internal)
		return internal;
	counter_inc(KPR_CNT_ERR_SCOPE_MISSING);
	*scope = KPR_SCOPE_DEFAULT;
	return svc;
}

static __always_inline struct svc_value *lb4_select_scope(struct svc_key4 *key, struct svc_value *svc, bool in_cluster)
{
	if (!in_cluster || !(svc->flags & KPR_SVC_F_TWO_SCOPES))
		return svc;
	return lb_scope_found(svc, lb4_lookup_service(key, KPR_SCOPE_INTERNAL), &key->scope);
}

static __always_inline struct svc_value *lb6_select_scope(struct svc_key6 *key, struct svc_value *svc, bool in_cluster)
{
	if (!in_cluster || !(svc->flags & KPR_SVC_F_TWO_SCOPES))
		return svc;
	return lb_scope_found(svc, lb6_lookup_service(key, KPR_SCOPE_INTERNAL), &key->scope);
}

/* ---- backends ---- */

/* sessionAffinity ClientIP: the backend this client (akey) used within the timeout, if it is still one of the
 * frontend's slots (affinity_match), so affinity never sticks to a removed backend. 0: none. */
static __always_inline __u32 lb_affinity_lookup(struct affinity_key *akey, __u32 timeout_s, __u64 now)
{
	struct affinity_value *seen = lb_map_affinity(akey);
	struct affinity_match_key match = {};

	if (!seen || now - seen->last_used_ns > (__u64)timeout_s * NSEC_PER_SEC)
		return 0;
	match.backend_id = seen->backend_id;
	match.rev_nat_id = akey->rev_nat_id;
	return lb_map_affinity_match(&match) ? seen->backend_id : 0;
}

/* Affinity first: the backend the client keeps while the frontend's timeout has not passed (0: none, or no affinity).
 * The caller filled in akey's client and kind. */
static __always_inline __u32 lb_affinity_pick(struct affinity_key *akey, const struct svc_value *svc, __u64 *now)
{
	__u32 backend_id;

	if (!(svc->flags & KPR_SVC_F_AFFINITY))
		return 0;
	*now = bpf_ktime_get_ns();
	akey->rev_nat_id = svc->rev_nat_id;
	backend_id = lb_affinity_lookup(akey, svc->affinity_timeout, *now);
	counter_inc(backend_id ? KPR_CNT_AFFINITY_HIT : KPR_CNT_AFFINITY_NEW);
	return backend_id;
}

/* The backend a slot names; a missing slot below count (should never happen) is counted. 0: none. */
static __always_inline __u32 lb_slot_backend(const struct svc_value *slot)
{
	if (!slot) {
		counter_inc(KPR_CNT_ERR_SLOT_MISSING);
		return 0;
	}
	return slot->backend_id;
}

/* A random slot (1..count) of the master entry at *key; the key's slot field is reused for the lookup. */
static __always_inline __u32 lb4_pick_slot(struct svc_key4 *key, __u16 count)
{
	key->slot = (bpf_get_prandom_u32() % count) + 1;
	return lb_slot_backend(lb_map_service4(key));
}

static __always_inline __u32 lb6_pick_slot(struct svc_key6 *key, __u16 count)
{
	key->slot = (bpf_get_prandom_u32() % count) + 1;
	return lb_slot_backend(lb_map_service6(key));
}

/* After the backend of backend_id was looked up (backend: the backends4/6 entry): a slot naming an unknown backend
 * (should never happen) is counted; a found one refreshes the client's affinity on every new connection, as
 * kube-proxy's `recent --set` does. */
static __always_inline void *lb_backend_found(void *backend, __u32 backend_id, const struct svc_value *svc,
					      struct affinity_key *akey, __u64 now)
{
	struct affinity_value seen = {};

	if (!backend) {
		if (backend_id) /* (a missing slot is counted already) */
			counter_inc(KPR_CNT_ERR_BACKEND_MISSING);
		return NULL;
	}
	if (svc->flags & KPR_SVC_F_AFFINITY) {
		seen.last_used_ns = now;
		seen.backend_id = backend_id;
		lb_map_affinity_set(akey, &seen);
	}
	return backend;
}

/* The backend for a new connection to the master entry *svc (count > 0) at *key: the client's affine one, else a random
 * slot. akey names the client (its client and kind filled in by the caller). NULL: none (inconsistent maps, counted). */
static __always_inline struct backend4 *lb4_select_backend(struct svc_key4 *key, const struct svc_value *svc,
							   struct affinity_key *akey, __u32 *backend_id)
{
	__u64 now = 0;

	*backend_id = lb_affinity_pick(akey, svc, &now);
	if (!*backend_id)
		*backend_id = lb4_pick_slot(key, svc->count);
	return lb_backend_found(*backend_id ? lb_map_backend4(backend_id) : NULL, *backend_id, svc, akey, now);
}

static __always_inline struct backend6 *lb6_select_backend(struct svc_key6 *key, const struct svc_value *svc,
							   struct affinity_key *akey, __u32 *backend_id)
{
	__u64 now = 0;

	*backend_id = lb_affinity_pick(akey, svc, &now);
	if (!*backend_id)
		*backend_id = lb6_pick_slot(key, svc->count);
	return lb_backend_found(*backend_id ? lb_map_backend6(backend_id) : NULL, *backend_id, svc, akey, now);
}

#endif /* KPR_LB_H */
