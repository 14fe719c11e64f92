/* Test-guest kit: ring-3 start of the BSP and of the APs. */
#include "kit.h"

#define LAPIC_ID 0xfee00020UL

__attribute__((weak)) void guest_ap_main(struct kit_cpu *cpu) { (void)cpu; }

void guest_user_start(u64 arg)
{
    (void)arg;
    kit_boot_parse();
    kit_cpus[0]->apic_id = kit_boot.apic_ids[0];
    kit_cpus[0]->online = 1;
    int code = guest_main();
    kit_exit(code);
}

/* Every AP reports in by itself, from ring 3, then runs the guest's AP code. */
void guest_ap_user_start(struct kit_cpu *c)
{
    u32 id = mmio_read32(LAPIC_ID) >> 24; /* MMIO from ring 3 */
    if (id != c->apic_id)
        kit_fail(KIT_EXIT_SMP, "cpu %u: FAIL local APIC id is %u, MP table says %u\n", c->index, id, c->apic_id);
    kit_printf("cpu %u: online\n", c->index);
    __atomic_store_n(&c->online, 1, __ATOMIC_RELEASE);
    guest_ap_main(c);
    kit_park();
}
