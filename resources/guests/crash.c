/* crash: crashes on purpose. crash=triple (default): loads a null IDT in ring 0
 * and faults (#UD -> #GP -> #DF -> triple fault). crash=pf: ring-3 access to an
 * unmapped address (kit reports it and exits 46). crash=ud: undefined opcode in
 * ring 3 (exit 38). */
#include "kit/kit.h"

static u64 triple_fault(u64 arg)
{
    (void)arg;
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } null_idt = {0, 0};
    __asm__ volatile("lidt %0\n\tud2" ::"m"(null_idt));
    return 0;
}

int guest_main(void)
{
    size_t l = 0;
    const char *mode = kit_cmdline_value("crash", &l);
    if (!mode || (l == 6 && !strncmp(mode, "triple", 6))) {
        kit_printf("crash: triple fault (null IDT, then ud2 in ring 0)\n");
        kit_flush();
        kit_ring0_call(triple_fault, 0);
        kit_printf("crash: FAIL still running after the triple fault\n");
        return KIT_EXIT_FAIL;
    }
    if (l == 2 && !strncmp(mode, "pf", 2)) {
        kit_printf("crash: page fault (ring-3 read of unmapped 0x8000000000)\n");
        return (int)*(volatile u64 *)0x8000000000UL;
    }
    if (l == 2 && !strncmp(mode, "ud", 2)) {
        kit_printf("crash: undefined opcode in ring 3\n");
        __asm__ volatile("ud2");
        return KIT_EXIT_FAIL;
    }
    kit_printf("crash: FAIL unknown crash= mode (want triple, pf or ud)\n");
    return KIT_EXIT_CMDLINE;
}
