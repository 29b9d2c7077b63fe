/* xcopy.c - what one CPU pays to copy 256 KiB blocks that another CPU has just written,
 * against copying blocks it wrote itself: the initiator's copy of receive-ring data, which
 * the sender's softirq wrote on its own CPU moments before, into the NBD socket. Used by
 * bench-initiator.sh (XCOPY=1) beside each transfer, since on this VM that cost moves with
 * the host's placement of the vCPUs (docs/PERFORMANCE.md, "Memory churn on the NBD paths,
 * and the NBD read slow mode").
 *
 * Usage: xcopy WRITER_CPU COPIER_CPU
 * Prints: "same X cross Y" in ms per MiB copied (the memcpy's own time, 512 blocks).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BLK (256 << 10)
#define ROUNDS 512

static char *src, *dst;
static atomic_int turn; /* 0: the writer's, 1: the copier's */
static double cross_ns;

static void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void *writer(void *arg)
{
    pin(*(int *)arg);
    for (int r = 0; r < ROUNDS; r++) {
        while (atomic_load(&turn) != 0)
            ;
        memset(src, r, BLK);
        atomic_store(&turn, 1);
    }
    return NULL;
}

static void *copier(void *arg)
{
    pin(*(int *)arg);
    for (int r = 0; r < ROUNDS; r++) {
        while (atomic_load(&turn) != 1)
            ;
        double t = now();
        memcpy(dst, src, BLK);
        cross_ns += now() - t;
        atomic_store(&turn, 0);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: xcopy WRITER_CPU COPIER_CPU\n");
        return 2;
    }
    int w = atoi(argv[1]), c = atoi(argv[2]);
    src = aligned_alloc(4096, BLK);
    dst = aligned_alloc(4096, BLK);
    if (!src || !dst)
        return 1;
    memset(src, 1, BLK);
    memset(dst, 1, BLK);
    double same_ns = 0;
    pin(c);
    for (int r = 0; r < ROUNDS; r++) {
        memset(src, r, BLK);
        double t = now();
        memcpy(dst, src, BLK);
        same_ns += now() - t;
    }
    pthread_t a, b;
    pthread_create(&a, NULL, writer, &w);
    pthread_create(&b, NULL, copier, &c);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    double mib = (double)ROUNDS * BLK / (1 << 20);
    printf("same %.3f cross %.3f\n", same_ns / 1e6 / mib, cross_ns / 1e6 / mib);
    return 0;
}
