/* soft: memory under constant load while the host soft-offlines (migrates) pages.
 *
 * Options: mib=N (default 8) buffer size, 2 MiB aligned; poll_ms=N (default 10)
 * how often COM1 is polled for input (each LSR read from ring 3 is a #GP trap);
 * max_rounds=N (default 0 = no limit) stop by itself after N rounds;
 * seed=N pattern seed.
 *
 * Round r writes every 4 KiB page (index i, GPA g): word 0 = r << 32 | i (the
 * counter), words 1..510 = addr ^ seed ^ r * 0x9e3779b97f4a7c15, word 511 =
 * XOR of words 0..510 (checksum); then it verifies the whole buffer. Round 0
 * (the first touch of every page) runs before `ready`, so all pages are
 * populated when the host picks its targets.
 *   soft: mib=N pages=P poll_ms=T
 *   soft: ready first=0x<GPA of the first page> last=0x<GPA of the last page>
 * then rounds 1, 2, ... until the line `stop` arrives on COM1 (other lines
 * are ignored) or max_rounds; then a final full verification:
 *   soft: machine_checks=M
 *   soft: rounds=R ok                                         exit 0
 * R = rounds completed after `ready`. Mismatch (in any round or the final check):
 *   soft: FAIL gpa=0x.. round=R want=0x.. got=0x..            exit 1
 * Machine checks are reported (ring 0) as
 *   soft: mce cpu=C bank=B status=0x.. addr=0x.. misc=0x.. mcg_status=0x..
 * and resumed when MCG_STATUS.RIPV is set (else the kit's fatal exit 50). */
#include "kit/kit.h"

#define PAGE 4096UL
#define HUGE (2UL << 20)
#define WORDS (PAGE / 8)
#define COM1 0x3f8

static u64 seed, npages, base, poll_ticks, next_poll;
static volatile u32 stop;
static char line[64];
static size_t linelen;

static inline u64 rdmsr0(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

enum kit_mce_action kit_mce_hook(struct kit_trap_frame *f, const struct kit_mce_info *info)
{
    (void)f;
    for (u32 i = 0; i < info->nr_valid; i++) {
        u32 b = info->banks[i].bank;
        kit_printf("soft: mce cpu=%u bank=%u status=0x%lx addr=0x%lx misc=0x%lx mcg_status=0x%lx\n",
                   kit_this_cpu()->index, b, info->banks[i].status, rdmsr0(MSR_IA32_MC_ADDR(b)),
                   rdmsr0(MSR_IA32_MC_MISC(b)), info->mcg_status);
    }
    return KIT_MCE_DEFAULT;
}

/* Non-blocking: drain COM1's receive FIFO, at most every poll_ms. */
static void poll_serial(bool force)
{
    u64 now = kit_rdtsc();
    if (!force && (i64)(now - next_poll) < 0)
        return;
    next_poll = now + poll_ticks;
    while (inb(COM1 + 5) & 1) {
        char c = (char)inb(COM1);
        if (c == '\n' || c == '\r') {
            if (linelen == 4 && !strncmp(line, "stop", 4))
                stop = 1;
            linelen = 0;
        } else if (linelen < sizeof(line)) {
            line[linelen++] = c;
        }
    }
}

static inline u64 val(u64 addr, u64 round) { return addr ^ seed ^ (round * 0x9e3779b97f4a7c15UL); }

static void fill(u64 round)
{
    for (u64 i = 0; i < npages; i++) {
        volatile u64 *w = (volatile u64 *)(base + i * PAGE);
        u64 sum = round << 32 | i;
        w[0] = sum;
        for (u64 j = 1; j < WORDS - 1; j++) {
            u64 v = val((u64)&w[j], round);
            w[j] = v;
            sum ^= v;
        }
        w[WORDS - 1] = sum;
        if ((i & 255) == 255)
            poll_serial(false);
    }
}

static int check(u64 round)
{
    for (u64 i = 0; i < npages; i++) {
        volatile u64 *w = (volatile u64 *)(base + i * PAGE);
        u64 sum = 0;
        for (u64 j = 0; j < WORDS; j++) {
            u64 want = j == 0 ? (round << 32 | i) : j == WORDS - 1 ? sum : val((u64)&w[j], round);
            u64 got = w[j];
            if (got != want) {
                kit_printf("soft: FAIL gpa=0x%lx round=%lu want=0x%lx got=0x%lx\n", (u64)&w[j], round, want, got);
                return KIT_EXIT_FAIL;
            }
            sum ^= got;
        }
        if ((i & 255) == 255)
            poll_serial(false);
    }
    return 0;
}

int guest_main(void)
{
    bool b1, b2, b3, b4;
    u64 mib = kit_cmdline_u64("mib", 8, &b1), poll_ms = kit_cmdline_u64("poll_ms", 10, &b2);
    u64 max_rounds = kit_cmdline_u64("max_rounds", 0, &b3);
    seed = kit_cmdline_u64("seed", 0x50f7c0de5eed1234UL, &b4);
    u64 heap = kit_heap_end(), start = (heap + HUGE - 1) & ~(HUGE - 1), end = 0;
    for (u32 i = 0; i < kit_boot.nr_e820; i++) { /* the e820 RAM range holding the heap */
        const struct kit_e820 *e = &kit_boot.e820[i];
        if (e->type == 1 && e->addr <= heap && heap < e->addr + e->size)
            end = e->addr + e->size;
    }
    if (b1 || b2 || b3 || b4 || !mib || !poll_ms || mib > (1UL << 20) || start + (mib << 20) > end) {
        kit_printf("soft: FAIL bad options or too little RAM (mib=N poll_ms=N max_rounds=N seed=N)\n");
        return KIT_EXIT_CMDLINE;
    }
    npages = (mib << 20) / PAGE;
    base = (u64)kit_alloc(mib << 20, HUGE);
    poll_ticks = poll_ms * kit_tsc_khz();
    kit_printf("soft: mib=%lu pages=%lu poll_ms=%lu\n", mib, npages, poll_ms);
    u64 round = 0;
    fill(0);
    if (check(0))
        return KIT_EXIT_FAIL;
    kit_printf("soft: ready first=0x%lx last=0x%lx\n", base, base + (npages - 1) * PAGE);
    u32 mces = kit_mce_count;
    u64 done = 0;
    while (!stop && !(max_rounds && done >= max_rounds)) {
        round++;
        fill(round);
        if (check(round))
            return KIT_EXIT_FAIL;
        done++;
        poll_serial(false);
    }
    if (check(round))
        return KIT_EXIT_FAIL;
    kit_printf("soft: machine_checks=%u\n", kit_mce_count - mces);
    kit_printf("soft: rounds=%lu ok\n", done);
    return 0;
}
