/* assist: executes the instructions a host with an emulated guest ring 0
 * cannot emulate and the VMM's emulation assists complete (docs/linux.md):
 * `int3` and `fwait`, in ring 0 through the kit's ring-0 call gate.
 *
 *   assist: int3 in ring 0
 *   assist: #BP cpu=0 rip=0x.. cs=0x8 expected_rip=0x..    (from the #BP hook)
 *   assist: int3 ok breakpoints=1
 *   assist: fwait in ring 0
 *   assist: fwait ok
 *   assist: ok
 * exit 0. On hardware KVM both run natively. On a host that emulates ring 0,
 * without assists (`vmm run --emulation-assists off`) the `int3` is a KVM
 * emulation failure and `vmm` exits 71 after `assist: int3 in ring 0`.
 * Failures: `assist: FAIL ...`, exit 1 (no #BP, wrong RIP, fwait skipped
 * code it should not have). */
#include "kit/kit.h"

static volatile u32 breakpoints;
static volatile u64 bp_rip, bp_cs;
extern char assist_after_int3[];

bool kit_exception_hook(struct kit_trap_frame *f)
{
    if (f->vector != 3)
        return false;
    /* #BP is a trap: the saved RIP is the instruction after int3. */
    bp_rip = f->rip;
    bp_cs = f->cs;
    __atomic_add_fetch(&breakpoints, 1, __ATOMIC_SEQ_CST);
    kit_printf("assist: #BP cpu=%u rip=0x%lx cs=0x%lx expected_rip=0x%lx\n", kit_this_cpu()->index, f->rip, f->cs,
               (u64)assist_after_int3);
    return true;
}

static u64 do_int3(u64 arg)
{
    (void)arg;
    __asm__ volatile("int3\n"
                     ".globl assist_after_int3\n"
                     "assist_after_int3:\n"
                     "nop" ::: "memory");
    return breakpoints;
}

/* fwait, then a marker the skip must not swallow: returns arg + 1. */
static u64 do_fwait(u64 arg)
{
    u64 r = arg;
    __asm__ volatile("fwait\n"
                     "inc %0"
                     : "+r"(r)::"memory");
    return r;
}

int guest_main(void)
{
    kit_printf("assist: int3 in ring 0\n");
    kit_flush();
    u64 n = kit_ring0_call(do_int3, 0);
    if (n != 1 || breakpoints != 1) {
        kit_printf("assist: FAIL int3 gave %lu breakpoints (want 1)\n", (u64)breakpoints);
        return KIT_EXIT_FAIL;
    }
    if (bp_rip != (u64)assist_after_int3 || (bp_cs & 3) != 0) {
        kit_printf("assist: FAIL #BP rip=0x%lx cs=0x%lx, want rip=0x%lx in ring 0\n", (u64)bp_rip, (u64)bp_cs,
                   (u64)assist_after_int3);
        return KIT_EXIT_FAIL;
    }
    kit_printf("assist: int3 ok breakpoints=%u\n", breakpoints);
    kit_printf("assist: fwait in ring 0\n");
    kit_flush();
    u64 r = kit_ring0_call(do_fwait, 41);
    if (r != 42) {
        kit_printf("assist: FAIL fwait: got %lu, want 42\n", r);
        return KIT_EXIT_FAIL;
    }
    kit_printf("assist: fwait ok\n");
    kit_printf("assist: ok\n");
    return 0;
}
