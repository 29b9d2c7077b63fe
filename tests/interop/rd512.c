/* rd512 DEV LBA: one 512-byte O_DIRECT read of sector LBA of DEV, to standard output.
 * For kernel-initiator.sh -B, in its busybox guest: busybox dd's buffer is not aligned,
 * and on the EINVAL that gives with O_DIRECT it reads again without it (through the page
 * cache, a page at a time), so it cannot ask the driver for one sector. Exit 1 with the
 * error on standard error. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    void *buf;
    if (argc != 3) {
        fprintf(stderr, "usage: rd512 DEV LBA\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0 || posix_memalign(&buf, 4096, 512) != 0) {
        fprintf(stderr, "rd512: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    ssize_t n = pread(fd, buf, 512, (off_t)strtoull(argv[2], NULL, 10) * 512);
    if (n != 512) {
        fprintf(stderr, "rd512: read of sector %s: %s\n", argv[2], n < 0 ? strerror(errno) : "short");
        return 1;
    }
    return write(1, buf, 512) == 512 ? 0 : 1;
}
