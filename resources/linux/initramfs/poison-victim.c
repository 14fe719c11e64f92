/*
 * poison-victim: a guest process whose memory a test poisons.
 *
 *   poison-victim [-p PAGES] [-m] [-n] [-c]
 *
 * 1. mmaps PAGES (default 4) anonymous pages, writes a pattern into every 64-bit word;
 * 2. prints each page's virtual and physical address (from /proc/self/pagemap; needs
 *    CAP_SYS_ADMIN, which init's shell has; only page 0 when PAGES > 64, since every
 *    line is a system call) and one summary line
 *        VICTIM READY pid=<pid> pages=<n> vaddr=0x<page 0> paddr=0x<page 0>
 * 3. waits for a line on stdin, EOF, or SIGUSR1 (-n: does not wait); with -c it
 *    checks every page over and over while it waits (exit 4 on the first mismatch,
 *    "VICTIM checksum ok: passes=<n>" when the line comes);
 *    -m first poisons page 0 itself with madvise(MADV_HWPOISON) (guest-only self-test);
 * 4. reads every page again and checks the pattern.
 *
 * A SIGBUS prints
 *        SIGBUS BUS_MCEERR_AR si_code=4 si_addr=0x... si_addr_lsb=12 page=<index>
 * (or BUS_MCEERR_AO = 5, early kill, printed while the process goes on). After an
 * action-required SIGBUS the process skips that page, checks the others, and exits 3.
 *
 * Exit status: 0 all pages read back intact, 3 recovered from SIGBUS BUS_MCEERR_AR,
 * 4 pattern mismatch, 1 setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_HWPOISON
#define MADV_HWPOISON 100
#endif
#ifndef BUS_MCEERR_AR
#define BUS_MCEERR_AR 4
#endif
#ifndef BUS_MCEERR_AO
#define BUS_MCEERR_AO 5
#endif

#define PAGE 4096UL
#define WORDS (PAGE / sizeof(uint64_t))

static unsigned char *region;
static size_t npages = 4;
static sigjmp_buf touch_env;
static volatile sig_atomic_t touching;
static volatile sig_atomic_t bad_page = -1;

static uint64_t pattern(size_t page, size_t word)
{
    return 0xC0FFEE0000000000ULL | ((uint64_t)page << 20) | word;
}

/* Async-signal-safe output helpers. */
static void put(const char *s) { (void)!write(STDOUT_FILENO, s, strlen(s)); }

static void put_num(unsigned long v, int base)
{
    char buf[32];
    int i = sizeof(buf);
    buf[--i] = '\0';
    do {
        buf[--i] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (base == 16)
        put("0x");
    put(&buf[i]);
}

static void on_sigbus(int sig, siginfo_t *si, void *uctx)
{
    (void)sig;
    (void)uctx;
    const char *name = si->si_code == BUS_MCEERR_AR   ? "BUS_MCEERR_AR"
                       : si->si_code == BUS_MCEERR_AO ? "BUS_MCEERR_AO"
                                                      : "other";
    unsigned long addr = (unsigned long)si->si_addr;
    long page = -1;
    if (addr >= (unsigned long)region && addr < (unsigned long)region + npages * PAGE)
        page = (long)((addr - (unsigned long)region) / PAGE);
    put("SIGBUS ");
    put(name);
    put(" si_code=");
    put_num((unsigned long)si->si_code, 10);
    put(" si_addr=");
    put_num(addr, 16);
    put(" si_addr_lsb=");
    put_num((unsigned long)si->si_addr_lsb, 10);
    put(" page=");
    if (page < 0)
        put("outside");
    else
        put_num((unsigned long)page, 10);
    put("\n");
    if (si->si_code == BUS_MCEERR_AO)
        return; /* asynchronous notice: the page is gone, the process goes on */
    if (touching && page >= 0) {
        bad_page = (sig_atomic_t)page;
        siglongjmp(touch_env, 1);
    }
    put("VICTIM unexpected SIGBUS, exiting\n");
    _exit(2);
}

static void on_sigusr1(int sig) { (void)sig; }

static uint64_t phys_addr(int pagemap, void *va)
{
    uint64_t entry;
    off_t off = (off_t)((uintptr_t)va / PAGE * sizeof(entry));
    if (pread(pagemap, &entry, sizeof(entry), off) != (ssize_t)sizeof(entry))
        return 0;
    if (!(entry >> 63 & 1)) /* not present */
        return 0;
    uint64_t pfn = entry & ((1ULL << 55) - 1);
    return pfn * PAGE + (uintptr_t)va % PAGE;
}

/* Reads every page but `skip`; returns the number of words that differ. */
static size_t check_pages(long skip)
{
    size_t bad = 0;
    for (size_t p = 0; p < npages; p++) {
        if ((long)p == skip)
            continue;
        volatile uint64_t *w = (volatile uint64_t *)(region + p * PAGE);
        for (size_t i = 0; i < WORDS; i++)
            if (w[i] != pattern(p, i))
                bad++;
    }
    return bad;
}

int main(int argc, char **argv)
{
    int self_poison = 0, wait_input = 1, checksum = 0, opt;
    while ((opt = getopt(argc, argv, "p:mnc")) != -1) {
        switch (opt) {
        case 'p':
            npages = strtoul(optarg, NULL, 0);
            if (npages == 0 || npages > 1UL << 20) {
                fprintf(stderr, "poison-victim: -p wants 1..1048576 pages, got %s\n", optarg);
                return 1;
            }
            break;
        case 'm': self_poison = 1; break;
        case 'n': wait_input = 0; break;
        case 'c': checksum = 1; break;
        default:
            fprintf(stderr, "usage: poison-victim [-p PAGES] [-m] [-n] [-c]\n");
            return 1;
        }
    }
    setvbuf(stdout, NULL, _IONBF, 0);

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, NULL)) {
        perror("poison-victim: sigaction(SIGBUS)");
        return 1;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigusr1; /* no SA_RESTART: interrupts the read() below */
    sigaction(SIGUSR1, &sa, NULL);

    region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED) {
        perror("poison-victim: mmap");
        return 1;
    }
    for (size_t p = 0; p < npages; p++) {
        uint64_t *w = (uint64_t *)(region + p * PAGE);
        for (size_t i = 0; i < WORDS; i++)
            w[i] = pattern(p, i);
    }

    int pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap < 0) {
        perror("poison-victim: open /proc/self/pagemap");
        return 1;
    }
    uint64_t pa0 = 0;
    /* Per-page lines only for small regions: each line is a system call, and
     * on hosts that emulate guest ring 0 a system call costs ~0.5 ms. */
    size_t shown = npages <= 64 ? npages : 1;
    for (size_t p = 0; p < shown; p++) {
        uint64_t pa = phys_addr(pagemap, region + p * PAGE);
        if (p == 0)
            pa0 = pa;
        printf("VICTIM page %zu vaddr=%p paddr=0x%llx\n", p, (void *)(region + p * PAGE),
               (unsigned long long)pa);
    }
    close(pagemap);
    if (pa0 == 0)
        printf("VICTIM warning: pagemap shows no physical address (needs CAP_SYS_ADMIN)\n");
    printf("VICTIM READY pid=%d pages=%zu vaddr=%p paddr=0x%llx\n", (int)getpid(), npages,
           (void *)region, (unsigned long long)pa0);

    if (self_poison) {
        if (madvise(region, PAGE, MADV_HWPOISON)) {
            printf("VICTIM madvise(MADV_HWPOISON) failed: %s\n", strerror(errno));
            return 1;
        }
        printf("VICTIM poisoned page 0 with MADV_HWPOISON\n");
    }

    if (wait_input && checksum) {
        /* Verify every page over and over until a line arrives on stdin: what a
         * workload sees while the host migrates (soft-offlines) its memory. */
        printf("VICTIM checksumming until Enter\n");
        volatile unsigned long passes = 0;
        struct pollfd pfd = { .fd = STDIN_FILENO, .events = POLLIN };
        for (;;) {
            if (sigsetjmp(touch_env, 1) != 0) {
                printf("VICTIM FAIL: SIGBUS on page %ld while checksumming\n", (long)bad_page);
                return 4;
            }
            touching = 1;
            size_t bad = check_pages(-1);
            touching = 0;
            passes++;
            if (bad) {
                printf("VICTIM FAIL: %zu words differ from the pattern in pass %lu\n", bad, passes);
                return 4;
            }
            if (poll(&pfd, 1, 0) > 0)
                break;
        }
        printf("VICTIM checksum ok: passes=%lu\n", passes);
    } else if (wait_input) {
        printf("VICTIM waiting: press Enter, close stdin, or kill -USR1 %d\n", (int)getpid());
        char c;
        ssize_t n;
        while ((n = read(STDIN_FILENO, &c, 1)) == 1 && c != '\n')
            ;
        if (n < 0 && errno == EINTR)
            printf("VICTIM woken by a signal\n");
    }

    printf("VICTIM touching %zu pages\n", npages);
    if (sigsetjmp(touch_env, 1) == 0) {
        touching = 1;
        size_t bad = check_pages(-1);
        touching = 0;
        if (bad) {
            printf("VICTIM FAIL: %zu words differ from the pattern\n", bad);
            return 4;
        }
        printf("VICTIM touch ok: all pages intact\n");
        return 0;
    }
    touching = 0;
    long skip = bad_page;
    printf("VICTIM survived SIGBUS on page %ld; checking the other pages\n", skip);
    if (sigsetjmp(touch_env, 1) != 0) {
        printf("VICTIM FAIL: a second page (%ld) raised SIGBUS\n", (long)bad_page);
        return 4;
    }
    touching = 1;
    size_t bad = check_pages(skip);
    touching = 0;
    if (bad) {
        printf("VICTIM FAIL: %zu words on other pages differ from the pattern\n", bad);
        return 4;
    }
    printf("VICTIM RECOVERED: other pages intact\n");
    return 3;
}
