/* Test-guest kit: machine-check handler (vector 18, IST 3), ring 0. */
#include "kit.h"

static inline u64 rdmsr0(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr0(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

__attribute__((weak)) enum kit_mce_action kit_mce_hook(struct kit_trap_frame *f, const struct kit_mce_info *info)
{
    (void)f;
    (void)info;
    return KIT_MCE_DEFAULT;
}

#define MCI_STATUS_VAL (1UL << 63)
#define MCI_STATUS_MISCV (1UL << 59)
#define MCI_STATUS_ADDRV (1UL << 58)

void kit_mce_handle(struct kit_trap_frame *f)
{
    static struct kit_mce_info infos[KIT_MAX_CPUS] __attribute__((section(".noinit"))); /* cleared per use */
    struct kit_cpu *c = kit_this_cpu();
    struct kit_mce_info *info = &infos[c->index];
    memset(info, 0, sizeof(*info));
    info->mcg_cap = rdmsr0(MSR_IA32_MCG_CAP);
    info->mcg_status = rdmsr0(MSR_IA32_MCG_STATUS);
    info->nr_banks = info->mcg_cap & 0xff;
    if (info->nr_banks > KIT_MCE_MAX_BANKS)
        info->nr_banks = KIT_MCE_MAX_BANKS;
    kit_printf("mce: cpu=%u mcg_cap=0x%lx mcg_status=0x%lx rip=0x%lx cs=0x%lx\n", c->index, info->mcg_cap,
               info->mcg_status, f->rip, f->cs);
    for (u32 b = 0; b < info->nr_banks; b++) {
        u64 st = rdmsr0(MSR_IA32_MC_STATUS(b));
        if (!(st & MCI_STATUS_VAL))
            continue;
        struct kit_mce_bank *k = &info->banks[info->nr_valid++];
        k->bank = b;
        k->status = st;
        k->addr = st & MCI_STATUS_ADDRV ? rdmsr0(MSR_IA32_MC_ADDR(b)) : 0;
        k->misc = st & MCI_STATUS_MISCV ? rdmsr0(MSR_IA32_MC_MISC(b)) : 0;
        kit_printf("mce: cpu=%u bank=%u status=0x%lx addr=0x%lx misc=0x%lx\n", c->index, b, k->status, k->addr,
                   k->misc);
    }
    __atomic_add_fetch(&kit_mce_count, 1, __ATOMIC_SEQ_CST);
    enum kit_mce_action a = kit_mce_hook(f, info);
    if (a == KIT_MCE_DEFAULT)
        a = info->mcg_status & 1 ? KIT_MCE_RESUME : KIT_MCE_FATAL; /* RIPV */
    if (a == KIT_MCE_FATAL) {
        kit_printf("mce: cpu=%u FATAL (mcg_status.RIPV=%lu)\n", c->index, info->mcg_status & 1);
        kit_exit(KIT_EXIT_EXCEPTION(18));
    }
    for (u32 i = 0; i < info->nr_valid; i++)
        wrmsr0(MSR_IA32_MC_STATUS(info->banks[i].bank), 0);
    wrmsr0(MSR_IA32_MCG_STATUS, 0); /* clear MCIP */
    kit_printf("mce: cpu=%u resumed\n", c->index);
}
