/* freemem.c - touch the guest's free memory before a transfer, or hold some of it during one.
 *
 * This VM's balloon reports free memory to the host (free page reporting,
 * /sys/module/page_reporting), which takes the reported pages back; the guest's first write
 * to such a page afterwards costs a fault in the host, charged to whichever guest task
 * touches it, as its own CPU (not as steal). The NBD socket's buffers are new pages for every
 * reply (AF_UNIX allocates each skb's pages afresh), so a transfer that starts when the free
 * lists are cold pays that fault for every page it draws: the "NBD read slow mode"
 * (docs/PERFORMANCE.md, "Session 33: the NBD read slow mode").
 *
 * Usage: freemem warm MIB   touch MIB of fresh anonymous memory, free it (process exit), and
 *                           print "warm MIB first touch X ms/MiB" (how cold it was: ~0.4-0.6
 *                           when the pages are still backed, 1.5-4 when the host took them)
 *        freemem hold MIB   touch up to MIB in 64 MiB steps, stopping after the first step whose
 *                           first touch costs more than 1.2 ms/MiB (the host's pages reached),
 *                           and keep it until stdin closes, printing "held ..." once touched: the
 *                           warm free pages are then all taken, and the next transfer draws cold
 *                           ones, as after a quiet spell (bench-initiator.sh COLD_MB)
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "warm") && strcmp(argv[1], "hold"))) {
        fprintf(stderr, "usage: freemem warm|hold MIB\n");
        return 2;
    }
    size_t mib = strtoul(argv[2], NULL, 10), n = mib << 20;
    char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("freemem: mmap");
        return 1;
    }
    /* Base pages, as the socket's order-3 blocks are: no huge page to zero at once. */
    madvise(p, n, MADV_NOHUGEPAGE);
    int hold = !strcmp(argv[1], "hold");
    size_t step = (size_t)64 << 20, done = 0;
    double t0 = now(), last = 0;
    while (done < n) {
        size_t end = done + step < n ? done + step : n;
        double s0 = now();
        for (size_t i = done; i < end; i += 4096)
            p[i] = 1;
        last = (now() - s0) * 1e3 / ((end - done) >> 20 ? (end - done) >> 20 : 1);
        done = end;
        if (hold && last > 1.2)
            break;
    }
    double t1 = now();
    printf("%s %zu MiB first touch %.3f ms/MiB (last 64 MiB %.3f)\n", argv[1], done >> 20,
           done ? (t1 - t0) * 1e3 / (done >> 20) : 0, last);
    fflush(stdout);
    if (hold) {
        char c;
        while (read(0, &c, 1) > 0)
            ;
    }
    return 0;
}
