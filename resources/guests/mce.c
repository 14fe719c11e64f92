/* mce: machine-check plumbing. Prints the MCA capabilities, then
 *   mce=wait (default): waits up to wait_ms=N (default 10000) for machine checks
 *     (e.g. injected by the VMM with KVM_X86_SET_MCE); the kit's #MC handler
 *     prints "mce: cpu=.. bank=.. status=.. addr=.. misc=.." lines; exits 0 after
 *     count=N (default 1) were handled and resumed, 1 on timeout. With `aps=1`
 *     it first starts every AP of the MP table (they park in ring 0 and take
 *     machine checks there too: the count is over all CPUs), e.g. to see an
 *     Intel-style broadcast reach every vCPU.
 *   mce=selftest: enters the vector-18 handler from ring 0 with a software-built
 *     frame (int $18 is not emulated on this host); the guest's hook resumes it;
 *     exits 0. */
#include "kit/kit.h"

static volatile u32 selftest;
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
    bool bad1, bad2;
    u64 wait_ms = kit_cmdline_u64("wait_ms", 10000, &bad1), want = kit_cmdline_u64("count", 1, &bad2);
    if (bad1 || bad2) {
        kit_printf("mce: FAIL bad wait_ms= or count= value\n");
        return KIT_EXIT_CMDLINE;
    }
    if (!mca) {
        kit_printf("mce: FAIL the CPU has no MCE/MCA (CPUID.1:EDX bits 7/14)\n");
        return KIT_EXIT_FAIL;
    }
    if (kit_cmdline_flag("aps"))
        kit_start_aps();
    kit_printf("mce: ready\n");
    u64 end = kit_rdtsc() + wait_ms * kit_tsc_khz();
    while (kit_mce_count < want) {
        if ((i64)(kit_rdtsc() - end) > 0) {
            kit_printf("mce: FAIL timeout: %u of %lu machine checks after %lu ms\n", kit_mce_count, want, wait_ms);
            return KIT_EXIT_FAIL;
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
