/* poison: target for host-injected hard memory poison (machine checks).
 *
 * Fills pages=N (default 16) 4 KiB pages of a 2 MiB-aligned buffer with the
 * pattern `word at gpa a = a ^ seed`, prints
 *   poison: mode=M pages=N page=K buffer=0x.. mca=1 mcg_cap=0x.. banks=B
 *   poison: target gpa=0x<page K> ready
 * and waits for the line `go` on COM1 (other lines are ignored). Then:
 *   mode=ar (default): reads the target page in ring 3 (the first load is of its
 *     first word). An action-required #MC on that load is recovered: the #MC
 *     hook sees RIP inside poison_check() and resumes at poison_check_fixup
 *     (which returns ~0 to the caller), so the faulting load is skipped.
 *   mode=ao: does not touch the target; waits up to wait_ms=N (default 5000)
 *     for an asynchronous (action-optional) #MC, which is resumed; one that
 *     arrived between `ready` and `go` (the usual case) counts too.
 * The #MC hook prints (ring 0, raw MSR values read before the kit clears them)
 *   poison: mce cpu=C bank=B status=0x.. addr=0x.. misc=0x.. mcg_status=0x..
 * for every bank with MCi_STATUS.VAL, then one of
 *   poison: recovered rip=0x.. load_gpa=0x..      (#MC on the target load)
 *   poison: resumed rip=0x..                      (elsewhere, with RIPV or in mode=ao)
 *   poison: FATAL mce rip=0x.. cs=0x..            (elsewhere without RIPV: exit 50)
 * Afterwards every page except the target is verified:
 *   poison: survived other_pages_ok=1             exit 0
 * No #MC (and, in mode=ar, the target page read back intact):
 *   poison: no machine check                      exit 2
 * Pattern mismatch anywhere (also the target without a #MC):
 *   poison: FAIL gpa=0x.. want=0x.. got=0x..      exit 1
 * reset=1: after surviving, reset the machine (i8042 0xfe) instead of exiting:
 *   poison: resetting
 * Bad options: poison: FAIL ..., exit 4.
 * selftest=1: no `go`; the target load reads an unmapped address and the #PF is
 *   passed to the kit's #MC handler (no valid banks, mcg_status=0), which checks
 *   the recovery path: prints "poison: recovered ..." and survives, exit 0. */
#include "kit/kit.h"

#define PAGE 4096UL
#define HUGE (2UL << 20)

enum { MODE_AR, MODE_AO };
static volatile u32 mode;
static volatile u32 recovered;
static volatile u64 recovered_rip, recovered_addr;

/* u64 poison_check(const u64 *p, u64 words, u64 seed): 0 if every word at
 * address a holds a ^ seed, else the address of the first bad word; ~0 if a
 * machine check hit one of its loads (the #MC hook redirects RIP to
 * poison_check_fixup). Leaf function, no stack use, so the fixup can `ret`. */
u64 poison_check(const u64 *p, u64 words, u64 seed);
extern char poison_check_end[], poison_check_fixup[];
__asm__(".text\n"
        ".globl poison_check, poison_check_end, poison_check_fixup\n"
        "poison_check:\n"
        "    lea (%rdi,%rsi,8), %rsi\n"
        "1:  cmp %rsi, %rdi\n"
        "    jae 2f\n"
        "    mov (%rdi), %rax\n" /* the load that takes the #MC */
        "    xor %rdi, %rax\n"
        "    cmp %rdx, %rax\n"
        "    jne 3f\n"
        "    add $8, %rdi\n"
        "    jmp 1b\n"
        "2:  xor %eax, %eax\n"
        "    ret\n"
        "3:  mov %rdi, %rax\n"
        "    ret\n"
        "poison_check_end:\n"
        "poison_check_fixup:\n"
        "    mov $-1, %rax\n"
        "    ret\n");

static inline u64 rdmsr0(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

enum kit_mce_action kit_mce_hook(struct kit_trap_frame *f, const struct kit_mce_info *info)
{
    u32 cpu = kit_this_cpu()->index;
    for (u32 i = 0; i < info->nr_valid; i++) {
        u32 b = info->banks[i].bank;
        kit_printf("poison: mce cpu=%u bank=%u status=0x%lx addr=0x%lx misc=0x%lx mcg_status=0x%lx\n", cpu, b,
                   info->banks[i].status, rdmsr0(MSR_IA32_MC_ADDR(b)), rdmsr0(MSR_IA32_MC_MISC(b)),
                   info->mcg_status);
    }
    if (!info->nr_valid)
        kit_printf("poison: mce cpu=%u no valid bank mcg_status=0x%lx\n", cpu, info->mcg_status);
    if ((f->cs & 3) == 3 && f->rip >= (u64)poison_check && f->rip < (u64)poison_check_end) {
        recovered_rip = f->rip;
        recovered_addr = f->rdi;
        f->rip = (u64)poison_check_fixup;
        __atomic_store_n(&recovered, 1, __ATOMIC_RELEASE);
        kit_printf("poison: recovered rip=0x%lx load_gpa=0x%lx\n", recovered_rip, recovered_addr);
        return KIT_MCE_RESUME;
    }
    if ((info->mcg_status & 1) || mode == MODE_AO) { /* RIPV, or the restartable wait loop of mode=ao */
        kit_printf("poison: resumed rip=0x%lx\n", f->rip);
        return KIT_MCE_RESUME;
    }
    kit_printf("poison: FATAL mce rip=0x%lx cs=0x%lx\n", f->rip, f->cs);
    return KIT_MCE_FATAL;
}

/* selftest=1: the target load reads an unmapped address instead (a real ring-3
 * #PF), which this hook hands to the kit's #MC handler as if it were the #MC:
 * checks the hook's RIP redirection and the fixup path without a host. */
static volatile u32 selftest;
#define SELFTEST_ADDR 0x8000000000UL /* above the kit's identity map */

bool kit_exception_hook(struct kit_trap_frame *f)
{
    if (selftest && f->vector == 14 && (f->cs & 3) == 3 && f->rip >= (u64)poison_check &&
        f->rip < (u64)poison_check_end) {
        kit_mce_handle(f);
        return true;
    }
    return false;
}

static void wait_go(void)
{
    char line[64];
    for (;;) {
        size_t n = 0;
        for (;;) {
            int c = kit_serial_getc();
            if (c == '\n' || c == '\r')
                break;
            if (n + 1 < sizeof(line))
                line[n++] = (char)c;
        }
        line[n] = 0;
        if (n == 2 && line[0] == 'g' && line[1] == 'o')
            return;
        if (n)
            kit_printf("poison: ignoring input \"%s\" (want \"go\")\n", line);
    }
}

static int mismatch(u64 a, u64 seed)
{
    kit_printf("poison: FAIL gpa=0x%lx want=0x%lx got=0x%lx\n", a, a ^ seed, *(volatile u64 *)a);
    return KIT_EXIT_FAIL;
}

int guest_main(void)
{
    bool b1, b2, b3, b4;
    u64 pages = kit_cmdline_u64("pages", 16, &b1), k = kit_cmdline_u64("page", 3, &b2);
    selftest = kit_cmdline_u64("selftest", 0, &b4) != 0;
    if (b4) {
        kit_printf("poison: FAIL bad selftest= value\n");
        return KIT_EXIT_CMDLINE;
    }
    u64 wait_ms = kit_cmdline_u64("wait_ms", 5000, &b3), seed = kit_cmdline_u64("seed", 0x9015011fee1600dUL, &b4);
    size_t ml = 0;
    const char *ms = kit_cmdline_value("mode", &ml);
    if (ms && ml == 2 && !strncmp(ms, "ao", 2))
        mode = MODE_AO;
    else if (ms && !(ml == 2 && !strncmp(ms, "ar", 2)))
        b1 = true;
    if (b1 || b2 || b3 || b4 || pages < 1 || k >= pages || pages > (1UL << 20)) {
        kit_printf("poison: FAIL bad options (want mode=ar|ao pages=N page=K<N wait_ms=N seed=N)\n");
        return KIT_EXIT_CMDLINE;
    }
    u32 a, b, c, d;
    kit_cpuid(1, 0, &a, &b, &c, &d);
    bool mca = (d & (1 << 7)) && (d & (1 << 14));
    u64 cap = mca ? kit_rdmsr(MSR_IA32_MCG_CAP) : 0;

    u64 *buf = kit_alloc(pages * PAGE, HUGE);
    u64 words = pages * PAGE / 8;
    for (u64 i = 0; i < words; i++)
        buf[i] = (u64)&buf[i] ^ seed;
    u64 target = (u64)buf + k * PAGE;
    kit_printf("poison: mode=%s pages=%lu page=%lu buffer=0x%lx mca=%u mcg_cap=0x%lx banks=%lu\n",
               mode == MODE_AO ? "ao" : "ar", pages, k, (u64)buf, mca, cap, cap & 0xff);
    u32 before = kit_mce_count; /* an action-optional #MC may arrive before `go` */
    kit_printf("poison: target gpa=0x%lx ready\n", target);
    if (selftest) {
        mode = MODE_AR;
        target = SELFTEST_ADDR;
        kit_printf("poison: selftest: reading unmapped 0x%lx instead of waiting for go\n", target);
    } else {
        wait_go();
    }

    if (mode == MODE_AR) {
        u64 r = poison_check((const u64 *)target, PAGE / 8, seed);
        if (r && r != ~0UL)
            return mismatch(r, seed);
        if (r == 0 && !recovered) {
            kit_printf("poison: no machine check\n");
            return 2;
        }
    } else {
        kit_tsc_khz(); /* calibrate (ring 0, ~25 ms) before the deadline is set */
        u64 end = kit_rdtsc() + wait_ms * kit_tsc_khz();
        while (kit_mce_count == before) {
            if ((i64)(kit_rdtsc() - end) > 0) {
                kit_printf("poison: no machine check\n");
                return 2;
            }
            kit_pause();
        }
    }
    for (u64 p = 0; p < pages; p++) {
        if (p == k)
            continue;
        u64 r = poison_check((const u64 *)((u64)buf + p * PAGE), PAGE / 8, seed);
        if (r == ~0UL) {
            kit_printf("poison: FAIL machine check on non-target page gpa=0x%lx\n", (u64)buf + p * PAGE);
            return KIT_EXIT_FAIL;
        }
        if (r)
            return mismatch(r, seed);
    }
    kit_printf("poison: machine_checks=%u recovered=%u\n", kit_mce_count - before, recovered);
    kit_printf("poison: survived other_pages_ok=1\n");
    if (kit_cmdline_u64("reset", 0, &b4) && !b4) {
        /* reset=1: reset the machine through the i8042 (as Linux's reboot=k);
         * with `vmm run --on-reset restart` the guest boots again. */
        kit_printf("poison: resetting\n");
        kit_flush();
        outb(0x64, 0xfe);
        kit_printf("poison: FAIL still running after the i8042 reset\n");
        return KIT_EXIT_FAIL;
    }
    return 0;
}
