/* kpr benchmark load generator and echo server (compiled by bench/run.py with gcc -O2 -pthread).
 *
 *   loadgen serve --name NAME --tcp PORT --udp PORT [--threads N]
 *       Echo server like kpr/lab/echo.py, in C so that it is never the bottleneck: every accepted TCP connection
 *       gets one line "NAME PEER_IP PEER_PORT\n" and is closed (the server closes first, so TIME_WAIT stays on the
 *       server); every UDP datagram gets the same line back. N threads, each with its own SO_REUSEPORT sockets
 *       and epoll loop. Prints "ready" once listening.
 *
 *   loadgen crr --target IP:PORT --duration S [--warmup S] [--conc C] [--threads T]
 *       TCP connect/request/response: C connections in flight (closed loop) over T threads, each one
 *       socket() + non-blocking connect() + wait for the server's line + read to its FIN + close(). Latency is
 *       measured from the connect() call to the end of the line (connect + first byte).
 *
 *   loadgen udprr --target IP:PORT --duration S [--warmup S] [--conc C] [--threads T]
 *       UDP request/response: C connected UDP sockets, each with one request in flight (a lost datagram is
 *       resent after 200 ms and counted).
 *
 * Both client modes print one JSON object: operations, rate per second, errors, latency percentiles in
 * microseconds, and the client's own CPU use (user + system seconds over the measured window), so the caller can
 * tell whether the client was the bottleneck. Only the window after --warmup counts.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int parse_target(const char *text, struct sockaddr_in *sa) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || colon - text >= (long)sizeof(host)) return -1;
    memcpy(host, text, colon - text);
    host[colon - text] = 0;
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons(atoi(colon + 1));
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

/* ------------------------------------------------------------------------------------------------ server */

static const char *server_name = "server";
static int tcp_port = 0, udp_port = 0;

static int reuseport_socket(int type, int port) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = INADDR_ANY};
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) die("bind");
    if (type == SOCK_STREAM && listen(fd, 4096) < 0) die("listen");
    return fd;
}

static int format_line(char *buf, size_t size, const struct sockaddr_in *peer) {
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &peer->sin_addr, ip, sizeof(ip));
    return snprintf(buf, size, "%s %s %u\n", server_name, ip, ntohs(peer->sin_port));
}

static void *serve_thread(void *arg) {
    (void)arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = -1, ufd = -1;
    if (tcp_port) {
        tfd = reuseport_socket(SOCK_STREAM, tcp_port);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = tfd};
        epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    }
    if (udp_port) {
        ufd = reuseport_socket(SOCK_DGRAM, udp_port);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = ufd};
        epoll_ctl(ep, EPOLL_CTL_ADD, ufd, &ev);
    }
    struct epoll_event events[MAX_EVENTS];
    char line[128], buf[2048];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == tfd) {
                for (int k = 0; k < 64; k++) {
                    struct sockaddr_in peer;
                    socklen_t len = sizeof(peer);
                    int c = accept4(tfd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) break;
                    int l = format_line(line, sizeof(line), &peer);
                    if (write(c, line, l) < 0) { /* the client went away: nothing to do */ }
                    close(c);
                }
            } else if (fd == ufd) {
                for (int k = 0; k < 64; k++) {
                    struct sockaddr_in peer;
                    socklen_t len = sizeof(peer);
                    ssize_t r = recvfrom(ufd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &len);
                    if (r < 0) break;
                    int l = format_line(line, sizeof(line), &peer);
                    sendto(ufd, line, l, 0, (struct sockaddr *)&peer, len);
                }
            }
        }
    }
    return NULL;
}

static int serve(int threads) {
    if (!tcp_port && !udp_port) {
        fprintf(stderr, "serve: give --tcp and/or --udp\n");
        return 2;
    }
    pthread_t tids[64];
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, serve_thread, NULL);
    usleep(50000); /* every thread has bound its sockets (bind errors exit the process) */
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ clients */

struct slot {
    int fd;
    double started;
    int got; /* the line is in */
};

struct worker {
    pthread_t tid;
    int index, conc;
    int udp;
    struct sockaddr_in target;
    double t_start, t_measure, t_end;
    uint64_t ops, errors, lost;
    uint32_t *lat; /* microseconds, measured window only */
    size_t nlat, caplat;
    char first_error[96];
};

static void record(struct worker *w, double started, double now) {
    if (started < w->t_measure || now > w->t_end) return;
    w->ops++;
    if (w->nlat == w->caplat) {
        w->caplat = w->caplat ? w->caplat * 2 : 65536;
        w->lat = realloc(w->lat, w->caplat * sizeof(uint32_t));
        if (!w->lat) die("realloc");
    }
    double us = (now - started) * 1e6;
    w->lat[w->nlat++] = us > 4e9 ? 4000000000u : (uint32_t)us;
}

static void note_error(struct worker *w, double now, const char *what, int err) {
    if (now >= w->t_measure && now <= w->t_end) w->errors++;
    if (!w->first_error[0]) snprintf(w->first_error, sizeof(w->first_error), "%s: %s", what, strerror(err));
}

static int tcp_open(struct worker *w, int ep, struct slot *s) {
    for (;;) {
        s->started = now_s();
        s->got = 0;
        s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s->fd < 0) {
            note_error(w, s->started, "socket", errno);
            usleep(1000);
            continue;
        }
        int r = connect(s->fd, (struct sockaddr *)&w->target, sizeof(w->target));
        if (r < 0 && errno != EINPROGRESS) {
            note_error(w, s->started, "connect", errno);
            close(s->fd);
            if (now_s() > w->t_end) return -1;
            usleep(1000);
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = s};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0) die("epoll_ctl");
        return 0;
    }
}

/* One connection: wait for the server's line (that is the latency), then read on until the server's FIN and only
 * then close, so the client is always the passive closer: TIME_WAIT stays on the server. A client that closed as
 * soon as it had the line would often close first, and tens of thousands of client sockets in TIME_WAIT make every
 * connect() scan the ephemeral port range for a free port (100 % CPU, a few hundred connections per second). */
static void *crr_thread(void *arg) {
    struct worker *w = arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc(w->conc, sizeof(struct slot));
    for (int i = 0; i < w->conc; i++) tcp_open(w, ep, &slots[i]);
    struct epoll_event events[MAX_EVENTS];
    char buf[256];
    int open = w->conc;
    while (open > 0) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 100);
        double now = now_s();
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            int done = 0;
            for (;;) {
                ssize_t r = read(s->fd, buf, sizeof(buf));
                if (r < 0 && errno == EAGAIN && (events[i].events & (EPOLLERR | EPOLLHUP))) {
                    /* an ICMP error while connecting: the socket is still in SYN_SENT, read() says EAGAIN */
                    int err = 0;
                    socklen_t len = sizeof(err);
                    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                    errno = err ? err : EIO;
                }
                if (r > 0) {
                    if (s->got == 0 && memchr(buf, '\n', r)) {
                        record(w, s->started, now);
                        s->got = 1; /* the line is in; wait for the server's FIN */
                    }
                    continue;
                }
                if (r < 0 && errno == EAGAIN) break;
                if (r < 0 && !s->got) note_error(w, now, "read", errno);
                if (r == 0 && !s->got) note_error(w, now, "read", EPIPE); /* closed before the line */
                done = 1;
                break;
            }
            if (done) {
                close(s->fd);
                if (now > w->t_end || tcp_open(w, ep, s) < 0) {
                    s->fd = -1;
                    open--;
                }
            }
        }
        if (now > w->t_end + 2.0) break; /* stragglers: give up on them */
    }
    for (int i = 0; i < w->conc; i++)
        if (slots[i].fd >= 0) close(slots[i].fd);
    free(slots);
    close(ep);
    return NULL;
}

static void *udprr_thread(void *arg) {
    struct worker *w = arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc(w->conc, sizeof(struct slot));
    char req[16] = "ping\n", buf[256];
    for (int i = 0; i < w->conc; i++) {
        struct slot *s = &slots[i];
        s->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s->fd < 0) die("socket");
        if (connect(s->fd, (struct sockaddr *)&w->target, sizeof(w->target)) < 0) die("connect (udp)");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
        s->started = now_s();
        if (send(s->fd, req, 5, 0) < 0) note_error(w, s->started, "send", errno);
    }
    struct epoll_event events[MAX_EVENTS];
    double last_scan = now_s();
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 50);
        double now = now_s();
        if (now > w->t_end) break;
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            for (;;) {
                ssize_t r = recv(s->fd, buf, sizeof(buf), 0);
                if (r < 0) {
                    if (errno != EAGAIN) note_error(w, now, "recv", errno);
                    break;
                }
                record(w, s->started, now);
                s->started = now;
                if (send(s->fd, req, 5, 0) < 0) note_error(w, now, "send", errno);
            }
        }
        if (now - last_scan > 0.05) {
            last_scan = now;
            for (int i = 0; i < w->conc; i++) {
                struct slot *s = &slots[i];
                if (now - s->started > 0.2) { /* lost request or reply: send again */
                    if (now >= w->t_measure) w->lost++;
                    s->started = now;
                    if (send(s->fd, req, 5, 0) < 0) note_error(w, now, "send", errno);
                }
            }
        }
    }
    for (int i = 0; i < w->conc; i++) close(slots[i].fd);
    free(slots);
    close(ep);
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int client(const char *mode, const char *target, double duration, double warmup, int conc, int threads) {
    struct sockaddr_in sa;
    if (parse_target(target, &sa) < 0) {
        fprintf(stderr, "bad --target %s (want IPv4:PORT)\n", target);
        return 2;
    }
    if (threads < 1) threads = 1;
    if (conc < threads) conc = threads;
    int udp = strcmp(mode, "udprr") == 0;
    struct worker *ws = calloc(threads, sizeof(struct worker));
    double t0 = now_s();
    for (int i = 0; i < threads; i++) {
        struct worker *w = &ws[i];
        w->index = i;
        w->udp = udp;
        w->conc = conc / threads + (i < conc % threads);
        w->target = sa;
        w->t_start = t0;
        w->t_measure = t0 + warmup;
        w->t_end = t0 + warmup + duration;
    }
    /* CPU is sampled at the start of the measured window and at its end. */
    for (int i = 0; i < threads; i++) pthread_create(&ws[i].tid, NULL, udp ? udprr_thread : crr_thread, &ws[i]);
    double wait = ws[0].t_measure - now_s();
    if (wait > 0) usleep((useconds_t)(wait * 1e6));
    double cpu0 = cpu_seconds(), m0 = now_s();
    wait = ws[0].t_end - now_s();
    if (wait > 0) usleep((useconds_t)(wait * 1e6));
    double cpu1 = cpu_seconds(), m1 = now_s();
    for (int i = 0; i < threads; i++) pthread_join(ws[i].tid, NULL);

    uint64_t ops = 0, errors = 0, lost = 0;
    size_t n = 0;
    const char *first_error = "";
    for (int i = 0; i < threads; i++) {
        ops += ws[i].ops;
        errors += ws[i].errors;
        lost += ws[i].lost;
        n += ws[i].nlat;
        if (!*first_error && ws[i].first_error[0]) first_error = ws[i].first_error;
    }
    uint32_t *all = malloc((n ? n : 1) * sizeof(uint32_t));
    size_t k = 0;
    for (int i = 0; i < threads; i++) {
        memcpy(all + k, ws[i].lat, ws[i].nlat * sizeof(uint32_t));
        k += ws[i].nlat;
    }
    qsort(all, n, sizeof(uint32_t), cmp_u32);
#define PCT(q) (n ? all[(size_t)((q) * (n - 1) + 0.5)] : 0)
    double window = m1 - m0;
    printf("{\"mode\": \"%s\", \"target\": \"%s\", \"threads\": %d, \"concurrency\": %d, \"seconds\": %.3f, "
           "\"operations\": %llu, \"rate\": %.1f, \"errors\": %llu, \"lost\": %llu, \"first_error\": \"%s\", "
           "\"latency_us\": {\"p50\": %u, \"p90\": %u, \"p99\": %u, \"max\": %u}, "
           "\"client_cpu_seconds\": %.3f, \"client_cpu_cores\": %.3f}\n",
           mode, target, threads, conc, duration, (unsigned long long)ops, ops / duration,
           (unsigned long long)errors, (unsigned long long)lost, first_error, PCT(0.5), PCT(0.9), PCT(0.99),
           n ? all[n - 1] : 0, cpu1 - cpu0, window > 0 ? (cpu1 - cpu0) / window : 0.0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen serve|crr|udprr [options]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const char *mode = argv[1], *target = NULL;
    double duration = 3, warmup = 0.5;
    int conc = 16, threads = 1;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "%s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--name")) server_name = v;
        else if (!strcmp(a, "--tcp")) tcp_port = atoi(v);
        else if (!strcmp(a, "--udp")) udp_port = atoi(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--target")) target = v;
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--conc")) conc = atoi(v);
        else {
            fprintf(stderr, "unknown option %s\n", a);
            return 2;
        }
        i++;
    }
    if (!strcmp(mode, "serve")) return serve(threads < 1 ? 1 : threads > 64 ? 64 : threads);
    if (!target) {
        fprintf(stderr, "%s needs --target IP:PORT\n", mode);
        return 2;
    }
    if (!strcmp(mode, "crr") || !strcmp(mode, "udprr")) return client(mode, target, duration, warmup, conc, threads);
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
