/* touch: demand-paging workload and first-touch benchmark (ring 3, BSP only).
 *
 * Options:
 *   mib=N        MiB to touch (default: all RAM of the e820 range above the
 *                image, from the next 2 MiB boundary, minus a 1 MiB margin)
 *   pattern=P    seq | random | huge | unaligned | all (default seq; `all` runs
 *                the four patterns in that order, each on its own quarter of
 *                the range so every pattern sees untouched memory)
 *   verify=1     after touching: check every touched page reads back as zero
 *                except the byte written (zero=0 skips that check), then write
 *                a signature (gpa ^ seed) to every 8-byte word and read it all
 *                back; the first bad GPA fails the run
 *   seed=N       signature seed (default 0x5eed0f7001c4a11e)
 *   wait=1       print "touch: waiting for a line" and wait for one line on
 *                COM1 before touching (lets a test prepare the host first)
 *   hold=1       after "touch: ok", print "touch: holding" and wait for one
 *                more line before exiting (lets a test inspect the host)
 *   op=O         write | read | zero (default write): what the first-touch loop
 *                does per page: write the page's byte, read one byte (which
 *                must be 0: untouched RAM reads as zero), or write a 0 byte.
 *                read and zero leave every page zero (overcommit tests: zero
 *                pages can be reclaimed); they cannot be combined with verify=1
 *
 * Output (per pattern):
 *   touch: range pattern=P start=0x.. end=0x.. stride_pages=S write_offset=O first_touch_ms=T
 *   touch: pattern=P pages=N first_touch_us_per_page=X.XX
 *   touch: verify pattern=P zero_ok=1 signature_ok=1          (verify=1 only)
 * then `touch: ok`, exit 0. Mismatch: `touch: FAIL gpa=0x.. want=0x.. got=0x..`,
 * exit 1. op=read finding a nonzero byte: `touch: FAIL gpa=0x.. want=0x0 got=0x..`,
 * exit 1. Bad options or too little RAM: `touch: FAIL ...`, exit 4.
 *
 * The timed loop is only the first-touch loop: one byte write per 4 KiB page. */
#include "kit/kit.h"

#define PAGE 4096UL
#define HUGE (2UL << 20)

enum pat { P_SEQ, P_RANDOM, P_HUGE, P_UNALIGNED, P_ALL };
static const char *const pat_names[] = {"seq", "random", "huge", "unaligned", "all"};

#define UNALIGNED_STRIDE 7UL /* pages; odd, so successive writes cross 2 MiB boundaries at odd offsets */

/* The byte written to page `gpa` (never 0, so a lost write is visible). */
static inline u8 touch_val(u64 gpa) { return (u8)(((gpa >> 12) & 0x7f) | 0x80); }

/* Where in the page the byte goes: offset 0, or an odd offset for `unaligned`. */
static inline u64 touch_off(enum pat p, u64 gpa)
{
    return p == P_UNALIGNED ? ((((gpa >> 12) * 0x2f + 0x11) & (PAGE - 1)) | 1) : 0;
}

enum op { OP_WRITE, OP_READ, OP_ZERO };
static const char *const op_names[] = {"write", "read", "zero"};
static enum op touch_op = OP_WRITE;
/* op=read: first page that did not read as zero (0: none). */
static u64 read_bad_gpa, read_bad_val;

/* The access of the first-touch loop at `a` (inside page `g`). */
static inline void touch_at(u64 a, u64 g)
{
    switch (touch_op) {
    case OP_READ: {
        u8 v = *(volatile u8 *)a;
        if (v && !read_bad_gpa) {
            read_bad_gpa = a;
            read_bad_val = v;
        }
        break;
    }
    case OP_ZERO:
        *(volatile u8 *)a = 0;
        break;
    default:
        *(volatile u8 *)a = touch_val(g);
    }
}

/* Bijection on k bits (k <= 63): multiply-xorshift, used to permute page indices. */
static inline u64 mix(u64 x, u64 mask, unsigned s)
{
    x = (x * 0x9e3779b97f4a7c15UL) & mask;
    x ^= x >> s;
    x = (x * 0xbf58476d1ce4e5b9UL + 0x2545f4914f6cdd1dUL) & mask;
    x ^= x >> s;
    return x;
}

/* First-touch loop over n pages at `base`; returns TSC ticks spent. */
static u64 first_touch(enum pat p, u64 base, u64 n)
{
    u64 t0, t1;
    switch (p) {
    case P_SEQ:
        t0 = kit_rdtsc();
        for (u64 i = 0; i < n; i++) {
            u64 g = base + i * PAGE;
            touch_at(g, g);
        }
        t1 = kit_rdtsc();
        break;
    case P_RANDOM: {
        unsigned k = 0;
        while ((1UL << k) < n)
            k++;
        u64 mask = (1UL << k) - 1;
        unsigned s = k / 2 + 1;
        t0 = kit_rdtsc();
        for (u64 i = 0; i <= mask; i++) {
            u64 j = mix(i, mask, s);
            if (j >= n)
                continue; /* cycle-walk: the permutation of [0, 2^k) restricted to [0, n) */
            u64 g = base + j * PAGE;
            touch_at(g, g);
        }
        t1 = kit_rdtsc();
        break;
    }
    case P_HUGE: {
        /* base is 2 MiB aligned: first the first page of every 2 MiB region, then the rest. */
        const u64 per = HUGE / PAGE;
        t0 = kit_rdtsc();
        for (u64 i = 0; i < n; i += per) {
            u64 g = base + i * PAGE;
            touch_at(g, g);
        }
        for (u64 i = 0; i < n; i++) {
            if (i % per == 0)
                continue;
            u64 g = base + i * PAGE;
            touch_at(g, g);
        }
        t1 = kit_rdtsc();
        break;
    }
    case P_UNALIGNED:
    default:
        /* base is 2 MiB aligned + 4 KiB; stride 7 pages, 7 passes cover every page once. */
        t0 = kit_rdtsc();
        for (u64 r = 0; r < UNALIGNED_STRIDE; r++)
            for (u64 i = r; i < n; i += UNALIGNED_STRIDE) {
                u64 g = base + i * PAGE;
                touch_at(g + touch_off(P_UNALIGNED, g), g);
            }
        t1 = kit_rdtsc();
        break;
    }
    return t1 - t0;
}

static int fail_at(u64 gpa, u64 want, u64 got)
{
    kit_printf("touch: FAIL gpa=0x%lx want=0x%lx got=0x%lx\n", gpa, want, got);
    return KIT_EXIT_FAIL;
}

/* Every page: zero except the touched byte. */
static int check_zero(enum pat p, u64 base, u64 n)
{
    for (u64 i = 0; i < n; i++) {
        u64 g = base + i * PAGE, off = touch_off(p, g);
        u64 bw = off & ~7UL, want_b = (u64)touch_val(g) << (8 * (off & 7));
        const volatile u64 *w = (const volatile u64 *)g;
        for (u64 o = 0; o < PAGE; o += 8) {
            u64 v = w[o / 8], want = o == bw ? want_b : 0;
            if (v != want)
                return fail_at(g + o, want, v);
        }
    }
    return 0;
}

static int check_signature(u64 base, u64 n, u64 seed)
{
    volatile u64 *s = (volatile u64 *)base, *e = (volatile u64 *)(base + n * PAGE);
    for (volatile u64 *w = s; w < e; w++)
        *w = (u64)w ^ seed;
    for (volatile u64 *w = s; w < e; w++) {
        u64 v = *w;
        if (v != ((u64)w ^ seed))
            return fail_at((u64)w, (u64)w ^ seed, v);
    }
    return 0;
}

static int run(enum pat p, u64 start, u64 len, bool verify, bool zero, u64 seed, u64 khz)
{
    u64 base = start, n;
    if (p == P_UNALIGNED)
        base += PAGE; /* not 2 MiB aligned */
    n = (start + len - base) / PAGE;
    if (!n) {
        kit_printf("touch: FAIL pattern=%s: no pages\n", pat_names[p]);
        return KIT_EXIT_CMDLINE;
    }
    u64 ticks = first_touch(p, base, n);
    u64 centi_us = ticks * 100000 / khz / n; /* ticks / (khz/1000) = us; x100 */
    kit_printf("touch: range pattern=%s start=0x%lx end=0x%lx stride_pages=%lu write_offset=%s first_touch_ms=%lu\n",
               pat_names[p], base, base + n * PAGE, p == P_UNALIGNED ? UNALIGNED_STRIDE : 1,
               p == P_UNALIGNED ? "odd" : "0", ticks / khz);
    kit_printf("touch: pattern=%s pages=%lu first_touch_us_per_page=%lu.%02lu\n", pat_names[p], n, centi_us / 100,
               centi_us % 100);
    if (read_bad_gpa)
        return fail_at(read_bad_gpa, 0, read_bad_val);
    if (verify) {
        int r = zero ? check_zero(p, base, n) : 0;
        if (!r)
            r = check_signature(base, n, seed ^ ((u64)p << 56));
        if (r)
            return r;
        kit_printf("touch: verify pattern=%s zero_ok=%u signature_ok=1\n", pat_names[p], zero);
    }
    return 0;
}

int guest_main(void)
{
    bool bad1, bad2, bad3, bad4;
    u64 mib = kit_cmdline_u64("mib", 0, &bad1);
    u64 verify = kit_cmdline_u64("verify", 0, &bad2);
    u64 zero = kit_cmdline_u64("zero", 1, &bad3);
    u64 seed = kit_cmdline_u64("seed", 0x5eed0f7001c4a11eUL, &bad4);
    if (bad1 || bad2 || bad3 || bad4 || verify > 1 || zero > 1) {
        kit_printf("touch: FAIL bad mib=, verify=, zero= or seed= value\n");
        return KIT_EXIT_CMDLINE;
    }
    size_t pl = 0;
    const char *ps = kit_cmdline_value("pattern", &pl);
    enum pat pat = P_SEQ;
    if (ps) {
        unsigned i;
        for (i = 0; i <= P_ALL; i++)
            if (pl == strlen(pat_names[i]) && !strncmp(ps, pat_names[i], pl))
                break;
        if (i > P_ALL) {
            kit_printf("touch: FAIL unknown pattern= (want seq, random, huge, unaligned or all)\n");
            return KIT_EXIT_CMDLINE;
        }
        pat = (enum pat)i;
    }
    const char *os = kit_cmdline_value("op", &pl);
    if (os) {
        unsigned i;
        for (i = 0; i <= OP_ZERO; i++)
            if (pl == strlen(op_names[i]) && !strncmp(os, op_names[i], pl))
                break;
        if (i > OP_ZERO || (i != OP_WRITE && verify)) {
            kit_printf("touch: FAIL op= must be write, read or zero, and only write goes with verify=1\n");
            return KIT_EXIT_CMDLINE;
        }
        touch_op = (enum op)i;
    }

    /* The e820 RAM range holding the heap; start at the next 2 MiB boundary. */
    u64 heap = kit_heap_end(), start = (heap + HUGE - 1) & ~(HUGE - 1), end = 0;
    for (u32 i = 0; i < kit_boot.nr_e820; i++) {
        const struct kit_e820 *e = &kit_boot.e820[i];
        if (e->type == 1 && e->addr <= heap && heap < e->addr + e->size)
            end = e->addr + e->size;
    }
    const u64 margin = 1UL << 20;
    u64 avail = end > start + margin ? (end - margin - start) & ~(PAGE - 1) : 0;
    u64 len = mib ? mib << 20 : avail;
    if (!len || len > avail) {
        kit_printf("touch: FAIL mib=%lu: only %lu MiB available at 0x%lx\n", mib, avail >> 20, start);
        return KIT_EXIT_CMDLINE;
    }
    if ((u64)kit_alloc(len, HUGE) != start) { /* claim it from the kit's allocator */
        kit_printf("touch: FAIL allocator disagrees about the start 0x%lx\n", start);
        return KIT_EXIT_PANIC;
    }
    u64 khz = kit_tsc_khz();          /* calibrate outside the timed loops */
    kit_printf("touch: mib=%lu start=0x%lx end=0x%lx pattern=%s op=%s verify=%lu tsc_khz=%lu\n", len >> 20, start,
               start + len, pat_names[pat], op_names[touch_op], verify, khz);

    bool bad5;
    if (kit_cmdline_u64("wait", 0, &bad5) && !bad5) {
        /* wait=1: let the host prepare (e.g. poison free frames) first. */
        kit_printf("touch: waiting for a line\n");
        for (int c = kit_serial_getc(); c != '\n' && c != '\r'; c = kit_serial_getc())
            ;
    }
    if (pat != P_ALL) {
        int r = run(pat, start, len, verify, zero, seed, khz);
        if (r)
            return r;
    } else {
        u64 q = (len / 4) & ~(HUGE - 1);
        if (!q) {
            kit_printf("touch: FAIL pattern=all needs at least 8 MiB\n");
            return KIT_EXIT_CMDLINE;
        }
        for (unsigned p = 0; p < P_ALL; p++) {
            int r = run((enum pat)p, start + p * q, q, verify, zero, seed, khz);
            if (r)
                return r;
        }
    }
    kit_printf("touch: ok\n");
    if (kit_cmdline_u64("hold", 0, &bad5) && !bad5) {
        /* hold=1: stay up (RAM still mapped) until one more line arrives. */
        kit_printf("touch: holding\n");
        for (int c = kit_serial_getc(); c != '\n' && c != '\r'; c = kit_serial_getc())
            ;
    }
    return 0;
}
