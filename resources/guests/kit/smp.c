/* Test-guest kit: starting application processors (INIT + SIPI + SIPI through the xAPIC). */
#include "kit.h"

#define LAPIC 0xfee00000UL
#define LAPIC_SVR (LAPIC + 0xf0)
#define LAPIC_ESR (LAPIC + 0x280)
#define LAPIC_ICR_LO (LAPIC + 0x300)
#define LAPIC_ICR_HI (LAPIC + 0x310)
#define TRAMP_BASE 0x10000UL
#define AP_TIMEOUT_MS 5000

extern char kit_tramp_start[], kit_tramp_end[];
extern char kit_tramp_cr3[], kit_tramp_cr4[], kit_tramp_stack[], kit_tramp_cpu[], kit_tramp_stage[];
extern u64 kit_cr3;
u64 kit_cr4_for_aps(void);
struct kit_cpu *kit_new_cpu(u32 index, u32 apic_id);

#define TRAMP_VAR(sym) ((volatile u64 *)(TRAMP_BASE + (sym - kit_tramp_start)))

static void icr_wait(void)
{
    for (u32 i = 0; i < 100000 && (mmio_read32(LAPIC_ICR_LO) & (1 << 12)); i++)
        kit_pause();
}

static void send_ipi(u32 apic_id, u32 lo)
{
    mmio_write32(LAPIC_ICR_HI, apic_id << 24);
    mmio_write32(LAPIC_ICR_LO, lo);
    icr_wait();
}

static bool wait_online(struct kit_cpu *c, u64 ms)
{
    u64 end = kit_rdtsc() + ms * kit_tsc_khz();
    while (!__atomic_load_n(&c->online, __ATOMIC_ACQUIRE)) {
        if ((i64)(kit_rdtsc() - end) > 0)
            return false;
        kit_pause();
    }
    return true;
}

u32 kit_cpus_online(void)
{
    u32 n = 0;
    for (u32 i = 0; i < KIT_MAX_CPUS; i++)
        if (kit_cpus[i] && kit_cpus[i]->online)
            n++;
    return n;
}

u32 kit_start_aps(void)
{
    kit_printf("cpu 0: online\n");
    if (kit_boot.nr_cpus <= 1)
        return 1;
    /* Software-enable the local APIC (spurious vector 0xff). */
    mmio_write32(LAPIC_SVR, 0x1ff);
    memcpy((void *)TRAMP_BASE, kit_tramp_start, kit_tramp_end - kit_tramp_start);
    *TRAMP_VAR(kit_tramp_cr3) = kit_cr3;
    *TRAMP_VAR(kit_tramp_cr4) = kit_cr4_for_aps();
    for (u32 i = 1; i < kit_boot.nr_cpus; i++) {
        u32 apic = kit_boot.apic_ids[i];
        struct kit_cpu *c = kit_new_cpu(i, apic);
        *TRAMP_VAR(kit_tramp_stack) = c->kstack_top;
        *TRAMP_VAR(kit_tramp_cpu) = (u64)c;
        *TRAMP_VAR(kit_tramp_stage) = 0;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        mmio_write32(LAPIC_ESR, 0);
        send_ipi(apic, 0x0000c500); /* INIT, level assert */
        send_ipi(apic, 0x00008500); /* INIT, level de-assert */
        kit_udelay(10000);
        u32 sipi = 0x00004600 | (TRAMP_BASE >> 12);
        send_ipi(apic, sipi);
        kit_udelay(200);
        if (!c->online && !*TRAMP_VAR(kit_tramp_stage))
            send_ipi(apic, sipi);
        if (!wait_online(c, AP_TIMEOUT_MS)) {
            static const char *const stage[] = {"never ran the real-mode trampoline", "stuck in real mode",
                                                "stuck in protected mode", "stuck in long mode before ring-0 setup"};
            u64 st = *TRAMP_VAR(kit_tramp_stage);
            kit_fail(KIT_EXIT_SMP, "smp: FAIL cpu %u (apic id %u) did not come online within %u ms: %s%s\n", i, apic,
                     AP_TIMEOUT_MS, st < 4 ? stage[st] : "?",
                     st == 3 && c->in_ring0 ? " (reached ring-0 C code, not ring 3)" : "");
        }
    }
    return kit_cpus_online();
}
