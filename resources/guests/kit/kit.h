/* Test-guest kit: shared declarations.
 *
 * Guests are freestanding x86-64 programs booted through the 64-bit Linux boot
 * protocol (see docs/ARCHITECTURE.md). The kit does the ring-0 setup (GDT, TSS,
 * IDT, paging, MCE) and then runs the guest's `guest_main` in ring 3. See
 * resources/guests/README.md for the API and the exit codes. */
#ifndef KIT_H
#define KIT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed long i64;
typedef unsigned long size_t;
typedef long ssize_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define KIT_MAX_CPUS 64
#define KIT_MAX_E820 128

/* ---- exit codes (the debug-exit byte written to port 0xf4) ---- */
#define KIT_EXIT_OK 0
#define KIT_EXIT_FAIL 1          /* a guest's check failed (its message says which) */
#define KIT_EXIT_MEMTEST 2       /* memory pattern mismatch */
#define KIT_EXIT_SMP 3           /* a vCPU did not come online / SMP check failed */
#define KIT_EXIT_CMDLINE 4       /* bad kernel command line */
#define KIT_EXIT_BOOT 5          /* bad boot data (boot_params, e820, MP table) */
#define KIT_EXIT_PANIC 30        /* kit internal error */
#define KIT_EXIT_EXCEPTION(v) (32 + (v)) /* unhandled CPU exception vector v (32..63) */

/* ---- CPU and boot data ---- */
struct kit_trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8;
    u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;
};

struct kit_tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct kit_cpu {
    struct kit_cpu *self;      /* %gs:0 */
    u32 index;                 /* 0 = BSP, then MP-table order */
    u32 apic_id;
    u64 kstack_top;            /* TSS.rsp0 */
    u64 ustack_top;            /* ring-3 stack */
    u64 ist_df_top, ist_nmi_top, ist_mc_top;
    volatile u32 online;       /* set by the CPU itself once in ring 3 */
    volatile u32 in_ring0;     /* set by an AP when it reached its 64-bit ring-0 entry */
    u32 linelen;
    char line[240];            /* ring-3 output line buffer */
    struct kit_tss tss __attribute__((aligned(16)));
};

struct kit_e820 {
    u64 addr, size;
    u32 type;
};

struct kit_boot {
    u64 boot_params;            /* physical address of boot_params (RSI at entry) */
    const char *cmdline;        /* NUL-terminated ("" if none) */
    u32 nr_e820;
    struct kit_e820 e820[KIT_MAX_E820];
    u64 ram_bytes;              /* sum of usable (type 1) RAM */
    u64 ram_top;                /* end of the highest usable RAM range */
    u32 nr_cpus;                /* processors in the MP table (enabled ones) */
    u32 apic_ids[KIT_MAX_CPUS]; /* index 0 = BSP */
    u64 image_end;              /* first byte above the guest image (page aligned) */
};

extern struct kit_boot kit_boot;
extern struct kit_cpu *kit_cpus[KIT_MAX_CPUS];

/* ---- provided by each guest ---- */
int guest_main(void);                       /* BSP, ring 3; return value = exit code */
void guest_ap_main(struct kit_cpu *cpu);    /* APs, ring 3 (weak default: returns) */

/* ---- per-CPU ---- */
static inline struct kit_cpu *kit_this_cpu(void)
{
    struct kit_cpu *c;
    __asm__ volatile("mov %%gs:0, %0" : "=r"(c));
    return c;
}
static inline unsigned kit_cpl(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

/* ---- output (ring 0 and ring 3) ---- */
void kit_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kit_vprintf(const char *fmt, __builtin_va_list ap);
int kit_snprintf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void kit_flush(void);
void kit_serial_write(const char *s, size_t n);
int kit_serial_getc(void);          /* blocking read of one byte from COM1 */
void kit_exit(int code) __attribute__((noreturn));
void kit_fail(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

/* ---- command line ---- */
const char *kit_cmdline_value(const char *key, size_t *len); /* "key=value" → value */
bool kit_cmdline_flag(const char *key);                      /* "key" or "key=..." present */
u64 kit_cmdline_u64(const char *key, u64 dflt, bool *bad);   /* decimal or 0x-hex */

/* ---- memory ---- */
void *kit_alloc(size_t size, size_t align);   /* bump allocator above the image, never freed */
u64 kit_heap_end(void);                        /* first byte the allocator has not handed out */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* ---- SMP ---- */
/* Start every AP of the MP table (INIT + SIPI + SIPI, one at a time); each
 * runs guest_ap_main in ring 3. Returns the number of CPUs online (BSP
 * included); on a timeout it prints why and exits with KIT_EXIT_SMP. */
u32 kit_start_aps(void);
u32 kit_cpus_online(void);
void kit_park(void) __attribute__((noreturn));  /* stop this CPU (cli; hlt in ring 0) */

/* ---- time ---- */
static inline u64 kit_rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
u64 kit_tsc_khz(void);                /* best estimate (CPUID), fallback 2 GHz */
void kit_udelay(u64 us);
static inline void kit_pause(void) { __asm__ volatile("pause"); }

/* ---- ring-0 services callable from ring 3 (the "ud2 gate") ---- */
/* Runs fn(arg) in ring 0 on this CPU with interrupts off; returns its result. */
u64 kit_ring0_call(u64 (*fn)(u64 arg), u64 arg);
u64 kit_rdmsr(u32 msr);                 /* works from ring 0 and ring 3 */
void kit_wrmsr(u32 msr, u64 val);       /* works from ring 0 and ring 3 */

/* ---- port I/O (ring 3: trapped by #GP and emulated by the kit if needed) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }

/* ---- machine checks ---- */
#define KIT_MCE_MAX_BANKS 32
struct kit_mce_bank {
    u32 bank;
    u64 status, addr, misc;
};
struct kit_mce_info {
    u64 mcg_cap, mcg_status;
    u32 nr_banks;          /* banks in MCG_CAP */
    u32 nr_valid;          /* entries in `banks` (those with MCi_STATUS.VAL) */
    struct kit_mce_bank banks[KIT_MCE_MAX_BANKS];
};
enum kit_mce_action { KIT_MCE_DEFAULT, KIT_MCE_RESUME, KIT_MCE_FATAL };
/* Weak hook, runs in ring 0 inside the #MC handler (IST stack) after the kit
 * printed the banks. KIT_MCE_DEFAULT: resume if MCG_STATUS.RIPV, else exit 50. */
enum kit_mce_action kit_mce_hook(struct kit_trap_frame *f, const struct kit_mce_info *info);
extern volatile u32 kit_mce_count;     /* machine checks handled so far */

/* Exception hook for guests (ring 0): return true if handled (frame may be edited). */
bool kit_exception_hook(struct kit_trap_frame *f);

/* MSRs */
#define MSR_IA32_MCG_CAP 0x179
#define MSR_IA32_MCG_STATUS 0x17a
#define MSR_IA32_MCG_CTL 0x17b
#define MSR_IA32_MC_CTL(i) (0x400 + 4 * (i))
#define MSR_IA32_MC_STATUS(i) (0x401 + 4 * (i))
#define MSR_IA32_MC_ADDR(i) (0x402 + 4 * (i))
#define MSR_IA32_MC_MISC(i) (0x403 + 4 * (i))

/* ---- internal (kit only) ---- */
void kit_putc0(char c);
void kit_trap_fatal(struct kit_trap_frame *f) __attribute__((noreturn));
void kit_mce_handle(struct kit_trap_frame *f);
void kit_cpu_init_ring0(struct kit_cpu *c);
void kit_enter_user(u64 rip, u64 rsp, u64 arg) __attribute__((noreturn));
void kit_boot_parse(void);
u64 kit_gate(u64 nr, u64 a, u64 b);
#define KIT_GATE_WRITE 1
#define KIT_GATE_CALL 2
#define KIT_GATE_PARK 3

static inline void kit_cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

#endif
