/* mce: machine-check plumbing. Prints the MCA capabilities, then
 *   mce=wait (default): waits up to wait_ms=N (default 10000) for machine checks
 *     (e.g. injected by the VMM with KVM_X86_SET_MCE); the kit's #MC handler
 *     prints "mce: cpu=.. bank=.. status=.. addr=.. misc=.." lines; exits 0 after
 *     count=N (default 1) were handled and resumed, 1 on timeout. With `aps=1`
 *     it first starts every AP of the MP table (they park in ring 0 and take
 *     machine checks there too: the count is over all CPUs), e.g. to see an
 *     Intel-style broadcast reach every vCPU.
 *     Delivery tests (machine checks in quick succession):
 *     pages=N: a buffer of N written pages at a 2 MiB boundary, named in the
 *       ready line ("mce: ready buffer=0x.. pages=N"), for the host to poison.
 *     dwell_ms=N: every #MC handler spins N ms before it returns, i.e. with
 *       MCG_STATUS.MCIP still set (the kit clears it after the hook).
 *     probe=K: the wait loop keeps reading page K of the buffer in ring 3
 *       (mce_probe); an #MC on that load is recovered (RIP moved to
 *       mce_probe_fixup, "mce: cpu=C recovered probe gpa=0x.."), then the
 *       probing stops.
 *     handler_touch=K: the first #MC handler reads page K of the buffer in
 *       ring 0, with MCIP set ("mce: cpu=C handler reading gpa=0x.. with MCIP
 *       set"): poison there is a machine check during a machine check.
 *   mce=selftest: enters the vector-18 handler from ring 0 with a software-built
 *     frame (int $18 is not emulated on this host); the guest's hook resumes it;
 *     exits 0. */
#include "kit/kit.h"

static volatile u32 selftest;
static u64 dwell_ms, tsc_khz, buffer, handler_touch = ~0UL;
static volatile u32 probe_hit;

/* u64 mce_probe(const u64 *p): the word at p; ~0 when a machine check hit the
 * load (the hook moves RIP to mce_probe_fixup). Leaf, no stack use. */
u64 mce_probe(const u64 *p);
extern char mce_probe_end[], mce_probe_fixup[];
__asm__(".text\n"
        ".globl mce_probe, mce_probe_end, mce_probe_fixup\n"
        "mce_probe:\n"
        "    mov (%rdi), %rax\n"
        "    ret\n"
        "mce_probe_end:\n"
        "mce_probe_fixup:\n"
        "    mov $-1, %rax\n"
        "    ret\n");
/* First valid bank each CPU saw (ring-0 output of several CPUs interleaves,
 * so `aps=1` prints these as whole lines from ring 3 at the end). */
static struct {
    volatile u32 seen;
    u32 bank;
    u64 status, addr, mcg_status;
} first[KIT_MAX_CPUS];

enum kit_mce_action kit_mce_hook(struct kit_trap_frame *f, const struct kit_mce_info *info)
{
    (void)f;
    u32 c = kit_this_cpu()->index;
    if (c < KIT_MAX_CPUS && !first[c].seen && info->nr_valid) {
        first[c].bank = info->banks[0].bank;
        first[c].status = info->banks[0].status;
        first[c].addr = info->banks[0].addr;
        first[c].mcg_status = info->mcg_status;
        first[c].seen = 1;
    }
    if (handler_touch != ~0UL) {
        u64 gpa = buffer + handler_touch * 4096;
        handler_touch = ~0UL;
        kit_printf("mce: cpu=%u handler reading gpa=0x%lx with MCIP set\n", c, gpa);
        u64 v = *(volatile u64 *)gpa;
        kit_printf("mce: cpu=%u handler read 0x%lx\n", c, v);
    }
    if (dwell_ms) {
        u64 end = kit_rdtsc() + dwell_ms * tsc_khz;
        while ((i64)(kit_rdtsc() - end) < 0)
            kit_pause();
    }
    /* Only the check for the probed page itself: an action-optional #MC for
     * another page may interrupt the probe too, and just resumes it. */
    bool on_probe = false;
    for (u32 i = 0; i < info->nr_valid; i++)
        on_probe |= (info->banks[i].addr & ~0xfffUL) == (f->rdi & ~0xfffUL);
    if ((f->cs & 3) == 3 && f->rip >= (u64)mce_probe && f->rip < (u64)mce_probe_end && on_probe) {
        kit_printf("mce: cpu=%u recovered probe gpa=0x%lx\n", c, f->rdi);
        f->rip = (u64)mce_probe_fixup;
        __atomic_store_n(&probe_hit, 1, __ATOMIC_RELEASE);
        return KIT_MCE_RESUME;
    }
    return selftest ? KIT_MCE_RESUME : KIT_MCE_DEFAULT;
}

/* `int $18` is an emulation failure on the nested-KVM host (in ring 0 too), so
 * the selftest builds the exception frame itself and jumps to the vector-18
 * stub: it checks the handler, MSR reads and iretq, not the IST switch. */
static u64 raise_mc(u64 unused)
{
    (void)unused;
    __asm__ volatile("mov %%rsp, %%rax\n\t"
                     "pushq $0x10\n\t"
                     "pushq %%rax\n\t"
                     "pushfq\n\t"
                     "pushq $0x08\n\t"
                     "lea 1f(%%rip), %%rax\n\t"
                     "pushq %%rax\n\t"
                     "jmp kit_vec18\n"
                     "1:" ::: "rax", "memory", "cc");
    return 0;
}

static u64 read_cr4(u64 unused)
{
    (void)unused;
    u64 v;
    __asm__ volatile("mov %%cr4, %0" : "=r"(v));
    return v;
}

int guest_main(void)
{
    u32 a, b, c, d;
    kit_cpuid(1, 0, &a, &b, &c, &d);
    bool mca = (d & (1 << 7)) && (d & (1 << 14));
    u64 cap = mca ? kit_rdmsr(MSR_IA32_MCG_CAP) : 0;
    u64 cr4 = kit_ring0_call(read_cr4, 0);
    kit_printf("mce: mca=%u mcg_cap=0x%lx banks=%lu cr4.mce=%lu\n", mca, cap, cap & 0xff, (cr4 >> 6) & 1);
    size_t l = 0;
    const char *mode = kit_cmdline_value("mce", &l);
    if (mode && l == 8 && !strncmp(mode, "selftest", 8)) {
        selftest = 1;
        kit_ring0_call(raise_mc, 0);
        if (kit_mce_count != 1) {
            kit_printf("mce: FAIL selftest: handler count %u\n", kit_mce_count);
            return KIT_EXIT_FAIL;
        }
        kit_printf("mce: selftest ok\n");
        return 0;
    }
    if (mode && !(l == 4 && !strncmp(mode, "wait", 4))) {
        kit_printf("mce: FAIL unknown mce= mode (want wait or selftest)\n");
        return KIT_EXIT_CMDLINE;
    }
    bool bad1, bad2, bad3, bad4, bad5, bad6;
    u64 wait_ms = kit_cmdline_u64("wait_ms", 10000, &bad1), want = kit_cmdline_u64("count", 1, &bad2);
    u64 pages = kit_cmdline_u64("pages", 0, &bad3), probe = kit_cmdline_u64("probe", ~0UL, &bad4);
    u64 touch = kit_cmdline_u64("handler_touch", ~0UL, &bad5);
    dwell_ms = kit_cmdline_u64("dwell_ms", 0, &bad6);
    if (bad1 || bad2 || bad3 || bad4 || bad5 || bad6 || pages > 4096 || (probe != ~0UL && probe >= pages) ||
        (touch != ~0UL && touch >= pages)) {
        kit_printf("mce: FAIL bad wait_ms=, count=, pages=, probe=, handler_touch= or dwell_ms= value\n");
        return KIT_EXIT_CMDLINE;
    }
    if (!mca) {
        kit_printf("mce: FAIL the CPU has no MCE/MCA (CPUID.1:EDX bits 7/14)\n");
        return KIT_EXIT_FAIL;
    }
    if (kit_cmdline_flag("aps"))
        kit_start_aps();
    tsc_khz = kit_tsc_khz(); /* calibrated here, in ring 3; the hook only reads it */
    if (pages) {
        u64 *buf = kit_alloc(pages * 4096, 2UL << 20);
        for (u64 i = 0; i < pages * 512; i++)
            buf[i] = (u64)&buf[i];
        buffer = (u64)buf;
        kit_printf("mce: ready buffer=0x%lx pages=%lu\n", buffer, pages);
    } else {
        kit_printf("mce: ready\n");
    }
    handler_touch = touch;
    const u64 *probe_at = probe != ~0UL ? (const u64 *)(buffer + probe * 4096) : 0;
    u64 end = kit_rdtsc() + wait_ms * tsc_khz;
    while (kit_mce_count < want) {
        if ((i64)(kit_rdtsc() - end) > 0) {
            kit_printf("mce: FAIL timeout: %u of %lu machine checks after %lu ms\n", kit_mce_count, want, wait_ms);
            return KIT_EXIT_FAIL;
        }
        if (probe_at && !__atomic_load_n(&probe_hit, __ATOMIC_ACQUIRE)) {
            u64 v = mce_probe(probe_at);
            if (v != ~0UL && v != (u64)probe_at) {
                kit_printf("mce: FAIL probe gpa=0x%lx read 0x%lx\n", (u64)probe_at, v);
                return KIT_EXIT_FAIL;
            }
        }
        kit_pause();
    }
    for (u32 c = 0; c < KIT_MAX_CPUS; c++)
        if (first[c].seen)
            kit_printf("mce: summary cpu=%u bank=%u status=0x%lx addr=0x%lx mcg_status=0x%lx\n", c, first[c].bank,
                       first[c].status, first[c].addr, first[c].mcg_status);
    kit_printf("mce: received count=%u\n", kit_mce_count);
    return 0;
}
