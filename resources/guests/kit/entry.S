/* Test-guest kit: boot entry, exception stubs, ring-3 entry, ud2 gate, AP trampoline. */

#define TRAMP_BASE 0x10000   /* AP real-mode trampoline (SIPI vector 0x10); free per ARCHITECTURE.md */

    .section .text.boot, "ax"
    .code64
    .globl _start
/* 64-bit Linux boot protocol: long mode, interrupts off, RSI = boot_params. */
_start:
    cli
    cld
    lea kit_bsp_boot_stack_top(%rip), %rsp
    xor %ebp, %ebp
    mov %rsi, %rdi
    call kit_bsp_entry
1:  hlt
    jmp 1b

    .text
/* void kit_enter_user(u64 rip, u64 rsp, u64 arg): iretq to CPL 3, IOPL 3, IF 0. */
    .globl kit_enter_user
kit_enter_user:
    mov %rdi, %rax
    pushq $0x1b             /* SS: user data, RPL 3 */
    pushq %rsi              /* RSP */
    pushq $0x3002           /* RFLAGS: IOPL=3, reserved bit 1 */
    pushq $0x23             /* CS: user code64, RPL 3 */
    pushq %rax              /* RIP */
    mov %rdx, %rdi
    xor %esi, %esi
    xor %edx, %edx
    xor %ebp, %ebp
    iretq

/* u64 kit_gate(u64 nr, u64 a, u64 b): ring-3 -> ring-0 service through #UD.
 * The sequence is `ud2` followed by the bytes "KG"; the #UD handler checks
 * them, runs service RAX with RDI/RSI, skips the 4 bytes and returns RAX. */
    .globl kit_gate
kit_gate:
    mov %rdi, %rax
    mov %rsi, %rdi
    mov %rdx, %rsi
    ud2
    .byte 'K', 'G'
    ret

/* Exception / interrupt stubs: push a dummy error code when the CPU does not. */
.macro STUB vec, has_err
    .globl kit_vec\vec
kit_vec\vec:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\vec
    jmp kit_trap_common
.endm
    STUB 0,0
    STUB 1,0
    STUB 2,0
    STUB 3,0
    STUB 4,0
    STUB 5,0
    STUB 6,0
    STUB 7,0
    STUB 8,1
    STUB 9,0
    STUB 10,1
    STUB 11,1
    STUB 12,1
    STUB 13,1
    STUB 14,1
    STUB 15,0
    STUB 16,0
    STUB 17,1
    STUB 18,0
    STUB 19,0
    STUB 20,0
    STUB 21,1
    STUB 22,0
    STUB 23,0
    STUB 24,0
    STUB 25,0
    STUB 26,0
    STUB 27,0
    STUB 28,0
    STUB 29,1
    STUB 30,1
    STUB 31,0
    STUB 32,0   /* any other vector lands here (reported as vector 32+) */

    .globl kit_vec_spurious
kit_vec_spurious:
    iretq

    .globl kit_vec_table
    .section .rodata
    .align 8
kit_vec_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32
    .quad kit_vec\v
    .endr
    .text

kit_trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    call kit_trap
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

/* AP entry in 64-bit mode (jumped to from the trampoline): RSP and RDI set. */
    .globl kit_ap_entry64
kit_ap_entry64:
    cld
    xor %ebp, %ebp
    call kit_ap_entry
1:  hlt
    jmp 1b

/* ---- AP trampoline: copied to TRAMP_BASE, entered in real mode at CS=TRAMP_BASE>>4, IP=0 ---- */
#define T(x) (TRAMP_BASE + (x) - kit_tramp_start)
    .section .rodata.tramp, "a"
    .globl kit_tramp_start, kit_tramp_end
    .globl kit_tramp_cr3, kit_tramp_stack, kit_tramp_cpu, kit_tramp_cr4, kit_tramp_stage
    .code16
kit_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    movl $1, (kit_tramp_stage - kit_tramp_start)
    lgdtl (tramp_gdtr - kit_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $T(tramp_pm32)
    .code32
tramp_pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    movl $2, T(kit_tramp_stage)
    mov T(kit_tramp_cr4), %eax
    mov %eax, %cr4
    mov T(kit_tramp_cr3), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax          /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000021, %eax     /* PG | NE | PE */
    mov %eax, %cr0
    ljmp $0x18, $T(tramp_lm64)
    .code64
tramp_lm64:
    movl $3, T(kit_tramp_stage)
    mov T(kit_tramp_stack), %rsp
    mov T(kit_tramp_cpu), %rdi
    movabs $kit_ap_entry64, %rax
    jmp *%rax

    .align 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00af9a000000ffff    /* 0x18: 64-bit code */
tramp_gdtr:
    .word 31
    .long T(tramp_gdt)
    .align 8
kit_tramp_cr3:   .quad 0
kit_tramp_cr4:   .quad 0
kit_tramp_stack: .quad 0
kit_tramp_cpu:   .quad 0
kit_tramp_stage: .quad 0        /* 1: real mode ran, 2: protected mode, 3: long mode */
kit_tramp_end:

    .section .note.GNU-stack, "", @progbits
