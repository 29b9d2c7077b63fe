/* aoegen.c - a minimal, independent AoE load generator, the cross-check for `aoe bench`.
 *
 * One file, no dependencies beyond libc; scripts/bench-compare.sh compiles it with gcc.
 * It shares no code with the Rust suite: frames are laid out by hand from AoEr11 (§2 header,
 * §3.1 ATA, §3.2 Query Config). It keeps a fixed window of ATA READ/WRITE SECTORS EXT
 * requests in flight, sends and receives in batches of 64 (sendmmsg/recvmmsg), receives only
 * the 36 header bytes of a read reply (MSG_TRUNC gives the wire length), sleeps in ppoll
 * after a short spin, and retransmits after a fixed timeout.
 *
 * Usage: aoegen IFACE SHELF SLOT read|randread|write|randwrite BS WINDOW SECONDS SPAN_SECTORS
 * Environment: AOEGEN_SPIN_US (default 50) busy-polls that long before sleeping in ppoll.
 * Output: one JSON object (mb_per_s, iops, p50/p99 latency in us, retransmits, cpu_s).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef ETH_P_AOE
#define ETH_P_AOE 0x88a2
#endif
#define HDR 36          /* Ethernet 14 + AoE 10 + ATA 12 */
#define BATCH 64
#define MAXW 4096
#define RTO_NS 20000000ull /* fixed retransmit timeout: 20 ms */
#define HBUCKETS 200000 /* latency histogram: 1 us buckets up to 200 ms */

static int fd;
static uint8_t me[6], peer[6];
static unsigned shelf, slot;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

static void die(const char *m) { perror(m); exit(1); }

/* Ethernet + AoE common header (AoEr11 §2): version 1, no flags. */
static void aoe_header(uint8_t *f, const uint8_t *dst, uint8_t cmd, uint32_t tag) {
    memcpy(f, dst, 6);
    memcpy(f + 6, me, 6);
    f[12] = ETH_P_AOE >> 8; f[13] = ETH_P_AOE & 0xff;
    f[14] = 0x10; f[15] = 0;
    f[16] = shelf >> 8; f[17] = shelf & 0xff; f[18] = slot; f[19] = cmd;
    f[20] = tag >> 24; f[21] = tag >> 16; f[22] = tag >> 8; f[23] = tag;
}

static void set_tag(uint8_t *f, uint32_t tag) {
    f[20] = tag >> 24; f[21] = tag >> 16; f[22] = tag >> 8; f[23] = tag;
}

static uint32_t get_tag(const uint8_t *f) {
    return (uint32_t)f[20] << 24 | (uint32_t)f[21] << 16 | (uint32_t)f[22] << 8 | f[23];
}

static uint64_t rng = 88172645463325252ull;
static uint64_t xorshift(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

struct slot { int busy; uint16_t gen, tries; uint64_t first, sent; };

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: aoegen IFACE SHELF SLOT read|randread|write|randwrite BS WINDOW SECONDS SPAN_SECTORS\n");
        return 2;
    }
    const char *ifname = argv[1];
    shelf = atoi(argv[2]); slot = atoi(argv[3]);
    const char *mode = argv[4];
    int write = strstr(mode, "write") != NULL, random = strncmp(mode, "rand", 4) == 0;
    unsigned bs = atoi(argv[5]), window = atoi(argv[6]);
    double seconds = atof(argv[7]);
    uint64_t span = strtoull(argv[8], NULL, 10);
    const char *spin_env = getenv("AOEGEN_SPIN_US");
    uint64_t spin_ns = (spin_env ? strtoull(spin_env, NULL, 10) : 50) * 1000;
    unsigned per = bs / 512;
    if (per < 1 || per > 255 || bs % 512 || window < 1 || window > MAXW || span < per) {
        fprintf(stderr, "aoegen: bad BS, WINDOW or SPAN\n");
        return 2;
    }

    fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_AOE));
    if (fd < 0) die("socket");
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) die("SIOCGIFINDEX");
    int ifindex = ifr.ifr_ifindex;
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) die("SIOCGIFHWADDR");
    memcpy(me, ifr.ifr_hwaddr.sa_data, 6);
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_AOE),
                              .sll_ifindex = ifindex};
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) die("bind");
    int big = 32 << 20, one = 1;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
    setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);

    /* Query Config (AoEr11 §3.2) to the broadcast MAC: the reply's source is the target. */
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    uint8_t q[60] = {0}, rb[9100];
    aoe_header(q, bcast, 1, 0x7fffffff);
    int found = 0;
    for (uint64_t end = now_ns() + 3000000000ull, next = 0; !found && now_ns() < end;) {
        if (now_ns() >= next) {
            if (send(fd, q, sizeof q, 0) < 0) die("send");
            next = now_ns() + 250000000ull;
        }
        struct pollfd p = {fd, POLLIN, 0};
        poll(&p, 1, 10);
        ssize_t n;
        while ((n = recv(fd, rb, sizeof rb, MSG_DONTWAIT)) >= 24) {
            if ((rb[15 - 1] & 0x08) && rb[19] == 1 && get_tag(rb) == 0x7fffffff &&
                ((unsigned)rb[16] << 8 | rb[17]) == shelf && rb[18] == slot) {
                memcpy(peer, rb + 6, 6);
                found = 1;
                break;
            }
        }
    }
    if (!found) { fprintf(stderr, "aoegen: no answer from e%u.%u on %s\n", shelf, slot, ifname); return 1; }

    /* One pre-built frame per slot. */
    size_t stride = HDR + (write ? bs : 0);
    if (stride < 60) stride = 60;
    uint8_t *arena = calloc(window, stride);
    struct slot *sl = calloc(window, sizeof *sl);
    uint32_t *hist = calloc(HBUCKETS, sizeof *hist);
    if (!arena || !sl || !hist) die("calloc");
    for (unsigned i = 0; i < window; i++) {
        uint8_t *f = arena + i * stride;
        aoe_header(f, peer, 0, 0);
        f[24] = write ? 0x41 : 0x40; /* aflags: E (LBA48), W */
        f[26] = per;
        f[27] = write ? 0x34 : 0x24; /* WRITE / READ SECTORS EXT */
        if (write) memset(f + HDR, 0xa5, bs);
    }
    struct iovec siov[BATCH], riov[BATCH];
    struct mmsghdr smsg[BATCH], rmsg[BATCH];
    static uint8_t rbuf[BATCH][64];
    memset(rmsg, 0, sizeof rmsg);
    for (int i = 0; i < BATCH; i++) {
        riov[i].iov_base = rbuf[i]; riov[i].iov_len = sizeof rbuf[i];
        rmsg[i].msg_hdr.msg_iov = &riov[i]; rmsg[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned pend[MAXW], npend = 0;
    uint64_t next_lba = 0, done = 0, bytes = 0, retrans = 0;
    uint64_t start = now_ns(), deadline = start + (uint64_t)(seconds * 1e9), last = start;
    uint64_t next_scan = start + RTO_NS / 4;
    for (unsigned i = 0; i < window; i++) pend[npend++] = i;
    for (unsigned i = 0; i < window; i++) {
        uint8_t *f = arena + i * stride;
        uint64_t lba = random ? (xorshift() % (span / per)) * per : next_lba;
        if (!random) next_lba = (next_lba + per) % (span - span % per);
        for (int b = 0; b < 6; b++) f[28 + b] = lba >> (8 * b);
        sl[i].busy = 1; sl[i].gen = 1;
        set_tag(f, 0x80000000u | (uint32_t)sl[i].gen << 16 | i);
    }
    uint64_t now = start;
    while ((now = now_ns()) < deadline) {
        /* Send what is pending. */
        while (npend) {
            unsigned k = npend < BATCH ? npend : BATCH;
            memset(smsg, 0, k * sizeof smsg[0]);
            for (unsigned j = 0; j < k; j++) {
                siov[j].iov_base = arena + pend[j] * stride;
                siov[j].iov_len = stride;
                smsg[j].msg_hdr.msg_iov = &siov[j]; smsg[j].msg_hdr.msg_iovlen = 1;
            }
            int n = sendmmsg(fd, smsg, k, MSG_DONTWAIT);
            if (n <= 0) break;
            uint64_t t = now_ns();
            for (int j = 0; j < n; j++) {
                sl[pend[j]].sent = t;
                if (!sl[pend[j]].first) sl[pend[j]].first = t;
            }
            memmove(pend, pend + n, (npend - n) * sizeof pend[0]);
            npend -= n;
        }
        int n = recvmmsg(fd, rmsg, BATCH, MSG_DONTWAIT | MSG_TRUNC, NULL);
        if (n > 0) {
            now = now_ns();
            last = now;
            for (int j = 0; j < n; j++) {
                uint8_t *f = rbuf[j];
                if (rmsg[j].msg_len < HDR || !(f[14] & 0x08) || f[19] != 0) continue;
                uint32_t tg = get_tag(f);
                unsigned i = tg & 0xffff;
                /* A reply to this request's first send or to any of its retransmissions. */
                if (!(tg & 0x80000000u) || i >= window || !sl[i].busy ||
                    ((sl[i].gen - (tg >> 16)) & 0x7fff) > sl[i].tries)
                    continue;
                if ((f[14] & 0x04) || (f[27] & 0x21)) {
                    fprintf(stderr, "aoegen: error reply (flags %#x status %#x)\n", f[14], f[27]);
                    return 1;
                }
                if (!write && rmsg[j].msg_len < HDR + bs) {
                    fprintf(stderr, "aoegen: short read reply (%u bytes)\n", rmsg[j].msg_len);
                    return 1;
                }
                uint64_t us = (now - sl[i].first) / 1000;
                hist[us < HBUCKETS ? us : HBUCKETS - 1]++;
                done++;
                bytes += bs;
                /* Reuse the slot at once for the next request. */
                uint8_t *rq = arena + i * stride;
                uint64_t lba = random ? (xorshift() % (span / per)) * per : next_lba;
                if (!random) next_lba = (next_lba + per) % (span - span % per);
                for (int b = 0; b < 6; b++) rq[28 + b] = lba >> (8 * b);
                sl[i].gen++;
                set_tag(rq, 0x80000000u | (uint32_t)(sl[i].gen & 0x7fff) << 16 | i);
                sl[i].first = 0;
                sl[i].tries = 0;
                pend[npend++] = i;
            }
            continue;
        }
        if (now >= next_scan) {
            for (unsigned i = 0; i < window; i++) {
                /* `now` was read before this pass's sends: a slot sent since is newer. */
                if (sl[i].busy && sl[i].sent <= now && now - sl[i].sent > RTO_NS) {
                    int queued = 0;
                    for (unsigned j = 0; j < npend; j++) queued |= pend[j] == i;
                    if (queued) continue;
                    sl[i].gen++;
                    sl[i].tries++;
                    set_tag(arena + i * stride, 0x80000000u | (uint32_t)(sl[i].gen & 0x7fff) << 16 | i);
                    pend[npend++] = i;
                    retrans++;
                }
            }
            next_scan = now + RTO_NS / 4;
            if (now - last > 5000000000ull) { fprintf(stderr, "aoegen: no reply for 5 s\n"); return 1; }
        }
        if (npend || now - last < spin_ns) continue;
        struct pollfd p = {fd, POLLIN, 0};
        struct timespec ts = {0, 1000000};
        ppoll(&p, 1, &ts, NULL);
    }
    double secs = (now - start) / 1e9;
    uint64_t acc = 0, p50 = 0, p99 = 0;
    for (unsigned u = 0; u < HBUCKETS; u++) {
        acc += hist[u];
        if (!p50 && acc * 2 >= done) p50 = u;
        if (!p99 && acc * 100 >= done * 99) { p99 = u; break; }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("{\"mb_per_s\": %.1f, \"iops\": %.0f, \"bytes\": %llu, \"seconds\": %.3f, "
           "\"latency_us\": {\"p50\": %llu, \"p99\": %llu}, \"retransmits\": %llu, \"generator_cpu_s\": %.2f}\n",
           bytes / secs / 1e6, done / secs, (unsigned long long)bytes, secs,
           (unsigned long long)p50, (unsigned long long)p99, (unsigned long long)retrans, cpu);
    return 0;
}
