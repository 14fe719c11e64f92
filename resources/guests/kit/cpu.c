/* Test-guest kit: ring-0 setup (paging, GDT, TSS, IDT, MCE) and the trap dispatcher.
 *
 * Ring 0 is emulated at ~1.7 M instructions/s on the project's nested-KVM host,
 * so everything here is kept short: page tables are written once, the IDT only
 * gets the 32 exception vectors plus the spurious vector, and all guest work
 * runs in ring 3. */
#include "kit.h"

#define PTE_P 0x1
#define PTE_W 0x2
#define PTE_U 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_PS 0x80

#define KSTACK_SIZE (16 << 10)
#define IST_SIZE (8 << 10)
#define USTACK_SIZE (64 << 10)
#define GDT_TSS0 5   /* first TSS slot (16 bytes = 2 entries each) */

extern char __bss_start[], __bss_end[], _end[];
extern const u64 kit_vec_table[];
extern char kit_vec_spurious[];

struct kit_boot kit_boot;
struct kit_cpu *kit_cpus[KIT_MAX_CPUS];

/* BSP data that must exist before the allocator: not zeroed, so kept out of .bss. */
__attribute__((section(".noinit"), aligned(16))) char kit_bsp_boot_stack[KSTACK_SIZE];
__asm__(".globl kit_bsp_boot_stack_top\n.set kit_bsp_boot_stack_top, kit_bsp_boot_stack + 16384");
__attribute__((section(".noinit"), aligned(4096))) static u64 pml4[512];
__attribute__((section(".noinit"), aligned(4096))) static u64 pdpt[512];

static u64 gdt[GDT_TSS0 + 2 * KIT_MAX_CPUS] __attribute__((aligned(16))) = {
    0,
    0x00af9b000000ffffUL, /* 0x08 kernel code64 */
    0x00cf93000000ffffUL, /* 0x10 kernel data */
    0x00cff3000000ffffUL, /* 0x18 user data (DPL 3) */
    0x00affb000000ffffUL, /* 0x20 user code64 (DPL 3) */
};
static u64 idt[256 * 2] __attribute__((aligned(16)));
static u64 heap_ptr;
static u64 cr4_value;
u64 kit_cr3;
volatile u32 kit_mce_count;

struct __attribute__((packed)) desc_ptr {
    u16 limit;
    u64 base;
};

static inline void wrmsr0(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline u64 rdmsr0(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

void *kit_alloc(size_t size, size_t align)
{
    /* Only the BSP allocates (before starting APs), so no lock is needed. */
    u64 p = (heap_ptr + align - 1) & ~(u64)(align - 1);
    heap_ptr = p + size;
    if (kit_boot.ram_top && heap_ptr > kit_boot.ram_top)
        kit_fail(KIT_EXIT_PANIC, "kit: out of memory allocating %lu bytes\n", (u64)size);
    return (void *)p;
}

u64 kit_heap_end(void) { return (heap_ptr + 4095) & ~4095UL; }

/* Identity-map [0, top) with user-accessible 2 MiB pages; 3..4 GiB (MMIO hole) uncached. */
static void build_page_tables(u64 top)
{
    u64 gib = (top + (1UL << 30) - 1) >> 30;
    if (gib < 4)
        gib = 4;
    if (gib > 512)
        gib = 512; /* one PDPT: 512 GiB */
    u64 *pd = kit_alloc(gib * 4096, 4096);
    for (u64 i = 0; i < 512; i++) {
        pml4[i] = 0;
        pdpt[i] = 0;
    }
    pml4[0] = (u64)pdpt | PTE_P | PTE_W | PTE_U;
    for (u64 g = 0; g < gib; g++) {
        u64 *d = pd + 512 * g;
        u64 flags = PTE_P | PTE_W | PTE_U | PTE_PS;
        if (g == 3)
            flags |= PTE_PCD | PTE_PWT;
        u64 addr = g << 30;
        for (u64 i = 0; i < 512; i++)
            d[i] = (addr + (i << 21)) | flags;
        pdpt[g] = (u64)d | PTE_P | PTE_W | PTE_U;
    }
    kit_cr3 = (u64)pml4;
}

static void idt_set(unsigned vec, u64 handler, unsigned ist)
{
    idt[2 * vec] = (handler & 0xffff) | (0x08UL << 16) | ((u64)ist << 32) | (0x8eUL << 40) |
                   ((handler >> 16 & 0xffff) << 48);
    idt[2 * vec + 1] = handler >> 32;
}

static void build_idt(void)
{
    for (unsigned v = 0; v < 32; v++) {
        unsigned ist = v == 8 ? 1 : v == 2 ? 2 : v == 18 ? 3 : 0;
        idt_set(v, kit_vec_table[v], ist);
    }
    idt_set(0xff, (u64)kit_vec_spurious, 0);
}

static bool cpu_has_mca(void)
{
    u32 a, b, c, d;
    kit_cpuid(1, 0, &a, &b, &c, &d);
    return (d & (1 << 7)) && (d & (1 << 14));
}

/* Load this CPU's GDT/TSS/IDT, CR4 (PAE|MCE), MCE banks and GS base. Ring 0. */
void kit_cpu_init_ring0(struct kit_cpu *c)
{
    struct kit_tss *t = &c->tss;
    memset(t, 0, sizeof(*t));
    t->rsp0 = c->kstack_top;
    t->ist[0] = c->ist_df_top;
    t->ist[1] = c->ist_nmi_top;
    t->ist[2] = c->ist_mc_top;
    t->iomap_base = sizeof(*t);
    u64 base = (u64)t, limit = sizeof(*t) - 1;
    unsigned slot = GDT_TSS0 + 2 * c->index;
    gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) | (((limit >> 16) & 0xf) << 48) |
                ((base >> 24 & 0xff) << 56);
    gdt[slot + 1] = base >> 32;

    struct desc_ptr g = {sizeof(gdt) - 1, (u64)gdt}, i = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lgdt %0" ::"m"(g));
    __asm__ volatile("lidt %0" ::"m"(i));
    __asm__ volatile("pushq $0x08\n\t"
                     "lea 1f(%%rip), %%rax\n\t"
                     "pushq %%rax\n\t"
                     "lretq\n"
                     "1:\n\t"
                     "xor %%eax, %%eax\n\t"
                     "mov %%eax, %%ds\n\t"
                     "mov %%eax, %%es\n\t"
                     "mov %%eax, %%fs\n\t"
                     "mov %%eax, %%gs\n\t"
                     "mov $0x10, %%eax\n\t"
                     "mov %%eax, %%ss" ::: "rax", "memory");
    __asm__ volatile("ltr %w0" ::"r"(slot * 8));
    c->self = c;
    wrmsr0(0xc0000101, (u64)c); /* GS_BASE */

    u64 cr0, cr4;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    cr0 = (cr0 & ~((1UL << 30) | (1UL << 29))) | (1 << 5); /* caches on (CD, NW clear), NE */
    __asm__ volatile("mov %0, %%cr0" ::"r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    cr4 |= (1 << 5); /* PAE */
    if (cpu_has_mca()) {
        u64 cap = rdmsr0(MSR_IA32_MCG_CAP);
        if (cap & (1 << 8))
            wrmsr0(MSR_IA32_MCG_CTL, ~0UL);
        unsigned banks = cap & 0xff;
        for (unsigned b = 0; b < banks; b++)
            wrmsr0(MSR_IA32_MC_CTL(b), ~0UL);
        cr4 |= (1 << 6); /* MCE */
    }
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4));
    cr4_value = cr4;
}

extern void guest_user_start(u64 arg) __attribute__((noreturn));

static struct kit_cpu *alloc_cpu_stacks(struct kit_cpu *c)
{
    u8 *k = kit_alloc(KSTACK_SIZE + 3 * IST_SIZE + USTACK_SIZE, 4096);
    c->kstack_top = (u64)(k + KSTACK_SIZE);
    c->ist_df_top = c->kstack_top + IST_SIZE;
    c->ist_nmi_top = c->ist_df_top + IST_SIZE;
    c->ist_mc_top = c->ist_nmi_top + IST_SIZE;
    c->ustack_top = c->ist_mc_top + USTACK_SIZE;
    return c;
}

struct kit_cpu *kit_new_cpu(u32 index, u32 apic_id)
{
    struct kit_cpu *c = kit_alloc(sizeof(*c), 64);
    memset(c, 0, sizeof(*c));
    c->index = index;
    c->apic_id = apic_id;
    alloc_cpu_stacks(c);
    kit_cpus[index] = c;
    return c;
}

/* BSP entry from _start (ring 0, VMM's page tables, boot stack). */
void kit_bsp_entry(u64 boot_params)
{
    u64 *z = (u64 *)__bss_start, nq = (__bss_end - __bss_start) / 8; /* both 16-aligned */
    __asm__ volatile("rep stosq" : "+D"(z), "+c"(nq) : "a"(0UL) : "memory");
    kit_boot.boot_params = boot_params;
    heap_ptr = ((u64)_end + 4095) & ~4095UL;
    kit_boot.image_end = heap_ptr;

    /* Highest RAM address from the e820 table (needed to size the identity map). */
    const u8 *bp = (const u8 *)boot_params;
    u32 n = bp[0x1e8];
    u64 top = 0;
    for (u32 i = 0; i < n && i < KIT_MAX_E820; i++) {
        const u8 *e = bp + 0x2d0 + 20 * i;
        u64 addr = *(const u64 *)e, size = *(const u64 *)(e + 8);
        if (*(const u32 *)(e + 16) == 1 && addr + size > top)
            top = addr + size;
    }
    build_page_tables(top);
    __asm__ volatile("mov %0, %%cr3" ::"r"(kit_cr3) : "memory");
    build_idt();

    /* COM1: 8N1, FIFOs on, interrupts off. */
    outb(0x3f9, 0);
    outb(0x3fb, 0x03);
    outb(0x3fa, 0xc7);
    outb(0x3fc, 0x03);

    struct kit_cpu *c = kit_new_cpu(0, 0);
    kit_cpu_init_ring0(c);
    kit_enter_user((u64)guest_user_start, c->ustack_top, 0);
}

/* AP entry (ring 0, 64-bit, kit page tables, stack = its kernel stack). */
void kit_ap_entry(struct kit_cpu *c)
{
    extern void guest_ap_user_start(u64 arg) __attribute__((noreturn));
    kit_cpu_init_ring0(c);
    c->in_ring0 = 1;
    kit_enter_user((u64)guest_ap_user_start, c->ustack_top, (u64)c);
}

u64 kit_cr4_for_aps(void) { return cr4_value; }

/* ---- traps ---- */

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
};

__attribute__((weak)) bool kit_exception_hook(struct kit_trap_frame *f)
{
    (void)f;
    return false;
}

void kit_trap_fatal(struct kit_trap_frame *f)
{
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    unsigned v = f->vector & 31;
    kit_printf("kit: FATAL exception %s vector=%lu error=0x%lx rip=0x%lx cs=0x%lx rflags=0x%lx rsp=0x%lx cr2=0x%lx cpu=%u\n",
               exc_names[v], f->vector, f->error, f->rip, f->cs, f->rflags, f->rsp, cr2, kit_this_cpu()->index);
    kit_printf("kit: rax=0x%lx rbx=0x%lx rcx=0x%lx rdx=0x%lx rsi=0x%lx rdi=0x%lx rbp=0x%lx\n", f->rax, f->rbx, f->rcx,
               f->rdx, f->rsi, f->rdi, f->rbp);
    kit_exit(KIT_EXIT_EXCEPTION(v));
}

/* #GP from ring 3 on an in/out instruction: do the access in ring 0 (this host
 * refuses ring-3 port I/O even with IOPL=3) and skip the instruction. */
static bool emulate_port_io(struct kit_trap_frame *f)
{
    if ((f->cs & 3) != 3 || f->error != 0)
        return false;
    const u8 *ip = (const u8 *)f->rip;
    unsigned len = 0, size = 4;
    for (;;) {
        u8 b = ip[len];
        if (b == 0x66)
            size = 2;
        else if ((b & 0xf0) != 0x40) /* REX is allowed and has no effect on in/out */
            break;
        if (++len > 4)
            return false;
    }
    u8 op = ip[len++];
    u16 port;
    switch (op) {
    case 0xe4: case 0xe5: case 0xe6: case 0xe7:
        port = ip[len++];
        break;
    case 0xec: case 0xed: case 0xee: case 0xef:
        port = (u16)f->rdx;
        break;
    default:
        return false;
    }
    if (!(op & 1))
        size = 1;
    if (op & 2) { /* out */
        if (size == 1) outb(port, (u8)f->rax);
        else if (size == 2) outw(port, (u16)f->rax);
        else outl(port, (u32)f->rax);
    } else {
        if (size == 1) f->rax = (f->rax & ~0xffUL) | inb(port);
        else if (size == 2) f->rax = (f->rax & ~0xffffUL) | inw(port);
        else f->rax = inl(port); /* 32-bit writes zero-extend */
    }
    f->rip += len;
    return true;
}

void kit_ring0_write(const char *s, size_t n);

static bool gate(struct kit_trap_frame *f)
{
    const u8 *ip = (const u8 *)f->rip;
    if (ip[0] != 0x0f || ip[1] != 0x0b || ip[2] != 'K' || ip[3] != 'G')
        return false;
    f->rip += 4;
    switch (f->rax) {
    case KIT_GATE_WRITE:
        kit_ring0_write((const char *)f->rdi, f->rsi);
        f->rax = 0;
        return true;
    case KIT_GATE_CALL:
        f->rax = ((u64(*)(u64))f->rdi)(f->rsi);
        return true;
    case KIT_GATE_PARK:
        for (;;)
            __asm__ volatile("cli; hlt");
    default:
        f->rip -= 4;
        return false;
    }
}

void kit_trap(struct kit_trap_frame *f)
{
    if (kit_exception_hook(f))
        return;
    switch (f->vector) {
    case 13:
        if (emulate_port_io(f))
            return;
        break;
    case 6:
        if (gate(f))
            return;
        break;
    case 18:
        kit_mce_handle(f);
        return;
    case 2:
        kit_printf("kit: NMI on cpu %u rip=0x%lx\n", kit_this_cpu()->index, f->rip);
        return;
    }
    kit_trap_fatal(f);
}

/* ---- ring-0 services for ring 3 ---- */

u64 kit_ring0_call(u64 (*fn)(u64), u64 arg)
{
    if (kit_cpl() == 0)
        return fn(arg);
    return kit_gate(KIT_GATE_CALL, (u64)fn, arg);
}

static u64 rdmsr_fn(u64 msr) { return rdmsr0((u32)msr); }
static u64 wrmsr_args[KIT_MAX_CPUS][2];
static u64 wrmsr_fn(u64 cpu)
{
    wrmsr0((u32)wrmsr_args[cpu][0], wrmsr_args[cpu][1]);
    return 0;
}

u64 kit_rdmsr(u32 msr) { return kit_ring0_call(rdmsr_fn, msr); }
void kit_wrmsr(u32 msr, u64 val)
{
    u32 i = kit_this_cpu()->index;
    wrmsr_args[i][0] = msr;
    wrmsr_args[i][1] = val;
    kit_ring0_call(wrmsr_fn, i);
}

void kit_park(void)
{
    kit_flush();
    if (kit_cpl() == 0)
        for (;;)
            __asm__ volatile("cli; hlt");
    kit_gate(KIT_GATE_PARK, 0, 0);
    for (;;)
        kit_pause();
}
