/* portio: checks ring-3 port I/O (on this host: the kit's #GP emulation) in every
 * encoding the emulator decodes. Byte accesses are verified through the UART
 * scratch register (0x3ff, dx forms) and the PIT/speaker port 0x61 (imm8
 * forms); word/dword forms (imm8 and dx, with and without REX) must complete
 * and write the right part of RAX. Prints "portio: ok", exits 0; a mismatch
 * prints "portio: FAIL ..." and exits 1. With `reset` it instead checks
 * that a guest reset restores the PICs (see reset_loop). */
#include "kit/kit.h"

#define FAIL(...)                          \
    do {                                   \
        kit_printf("portio: FAIL " __VA_ARGS__); \
        return KIT_EXIT_FAIL;              \
    } while (0)

/* reset=1: print the PIC masks, scribble on them, reset through the i8042.
 * Under `vmm run --on-reset restart` every boot must print the power-on
 * masks again (a reset restores the platform, not just RAM and vCPUs). */
static int reset_loop(void)
{
    kit_printf("portio: pic imr master=0x%x slave=0x%x\n", inb(0x21), inb(0xa1));
    outb(0x21, 0x5a);
    outb(0xa1, 0xa5);
    kit_flush();
    outb(0x64, 0xfe);
    kit_udelay(1000000);
    kit_printf("portio: FAIL the i8042 reset did not happen\n");
    return KIT_EXIT_FAIL;
}

int guest_main(void)
{
    if (kit_cmdline_flag("reset"))
        return reset_loop();
    /* dx forms, byte: UART scratch register. */
    for (unsigned v = 0; v < 256; v += 0x55) {
        outb(0x3ff, (u8)v);
        u8 r = inb(0x3ff);
        if (r != v)
            FAIL("scratch register: wrote 0x%x read 0x%x (outb/inb %%dx)\n", v, r);
    }
    /* in al, dx must keep RAX[63:8]. */
    u64 rax = 0x1122334455667700UL;
    outb(0x3ff, 0x5a);
    __asm__ volatile("inb %%dx, %%al" : "+a"(rax) : "d"((u16)0x3ff));
    if (rax != 0x112233445566775aUL)
        FAIL("inb %%dx, %%al gave rax=0x%lx (want 0x112233445566775a)\n", rax);
    /* REX-prefixed byte in (rex.w has no effect on in/out). */
    rax = 0;
    __asm__ volatile(".byte 0x48; inb %%dx, %%al" : "+a"(rax) : "d"((u16)0x3ff));
    if (rax != 0x5a)
        FAIL("rex.w inb %%dx gave rax=0x%lx\n", rax);
    /* imm8 forms, byte: port 0x61 bits 0-1 (PIT gate 2, speaker data) read back. */
    u8 old;
    __asm__ volatile("inb $0x61, %0" : "=a"(old));
    for (u8 bits = 0; bits < 4; bits++) {
        u8 v = (old & ~3) | bits, r;
        __asm__ volatile("outb %0, $0x61" ::"a"(v));
        __asm__ volatile("inb $0x61, %0" : "=a"(r));
        if ((r & 3) != bits)
            FAIL("port 0x61: wrote bits %u read 0x%x (outb/inb imm8)\n", bits, r);
    }
    __asm__ volatile("outb %0, $0x61" ::"a"(old));
    /* word/dword forms: must complete; in eax zero-extends, in ax keeps RAX[63:16]. */
    rax = ~0UL;
    __asm__ volatile("inl %%dx, %%eax" : "+a"(rax) : "d"((u16)0x3ff));
    if (rax >> 32)
        FAIL("inl %%dx did not zero-extend: rax=0x%lx\n", rax);
    rax = ~0UL;
    __asm__ volatile("inw %%dx, %%ax" : "+a"(rax) : "d"((u16)0x3ff));
    if ((rax >> 16) != 0xffffffffffffUL)
        FAIL("inw %%dx clobbered rax[63:16]: rax=0x%lx\n", rax);
    rax = ~0UL;
    __asm__ volatile("inl $0x80, %%eax" : "+a"(rax));
    if (rax >> 32)
        FAIL("inl imm8 did not zero-extend: rax=0x%lx\n", rax);
    rax = ~0UL;
    __asm__ volatile("inw $0x80, %%ax" : "+a"(rax));
    if ((rax >> 16) != 0xffffffffffffUL)
        FAIL("inw imm8 clobbered rax[63:16]: rax=0x%lx\n", rax);
    __asm__ volatile("outw %%ax, $0x80" ::"a"(0x1234));
    __asm__ volatile("outl %%eax, $0x80" ::"a"(0x12345678));
    __asm__ volatile("outw %%ax, %%dx" ::"a"(0x1234), "d"((u16)0x80));
    __asm__ volatile("outl %%eax, %%dx" ::"a"(0x12345678), "d"((u16)0x80));
    /* The byte test again after the wide accesses (RIP advanced correctly). */
    outb(0x3ff, 0xa5);
    if (inb(0x3ff) != 0xa5)
        FAIL("scratch register lost after word/dword accesses\n");
    kit_printf("portio: ok\n");
    return 0;
}
