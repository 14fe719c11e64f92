/* Test-guest kit: string functions, formatted output over COM1, exit, command line. */
#include "kit.h"

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4

void *memset(void *d, int c, size_t n)
{
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}
void *memcpy(void *d, const void *s, size_t n)
{
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}
int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}
size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}
int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i] || !a[i])
            return (u8)a[i] - (u8)b[i];
    }
    return 0;
}

/* ---- serial ---- */

/* Ring 0: write bytes to the UART, waiting for THRE before each 16-byte FIFO burst. */
void kit_ring0_write(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        for (u32 spin = 0; !(inb(COM1 + 5) & 0x20) && spin < 1000000; spin++)
            kit_pause();
        for (unsigned k = 0; k < 16 && i < n; k++, i++)
            outb(COM1, (u8)s[i]);
    }
}

/* Serial lock: holds the owner's CPU index + 1, so that whole lines from
 * several CPUs never interleave. Ring 3 takes it per line; ring-0 printf
 * (exception handlers) takes it for the whole message, except when the
 * handler interrupted its own CPU's holder (then it writes unlocked, a
 * harmless interleave instead of a deadlock). */
static volatile u32 serial_lock;

static u32 serial_owner_id(void)
{
    struct kit_cpu *c = kit_this_cpu();
    return c ? c->index + 1 : 0xffffffffu;
}

/* Returns false if this CPU already holds the lock (nothing to release). */
static bool lock_serial(void)
{
    u32 me = serial_owner_id();
    if (serial_lock == me)
        return false;
    u32 free = 0;
    while (!__atomic_compare_exchange_n(&serial_lock, &free, me, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        free = 0;
        kit_pause();
    }
    return true;
}
static void unlock_serial(bool taken)
{
    if (taken)
        __atomic_store_n(&serial_lock, 0, __ATOMIC_RELEASE);
}

/* Ring 3 goes through the ud2 gate (one trap per write instead of two per byte). */
void kit_serial_write(const char *s, size_t n)
{
    bool taken = lock_serial();
    if (kit_cpl() == 0)
        kit_ring0_write(s, n);
    else
        kit_gate(KIT_GATE_WRITE, (u64)s, n);
    unlock_serial(taken);
}

int kit_serial_getc(void)
{
    while (!(inb(COM1 + 5) & 1))
        kit_pause();
    return inb(COM1);
}

void kit_flush(void)
{
    struct kit_cpu *c = kit_this_cpu();
    if (c && c->linelen) {
        u32 n = c->linelen;
        c->linelen = 0;
        kit_serial_write(c->line, n);
    }
}

/* Ring 3: per-CPU line buffer, written (under the serial lock) per line. */
static void emit(char ch)
{
    struct kit_cpu *c = kit_this_cpu();
    c->line[c->linelen++] = ch;
    if (ch == '\n' || c->linelen == sizeof(c->line))
        kit_flush();
}

/* ---- printf ---- */

/* Output sink: a caller's buffer (snprintf), a ring-0 chunk written straight
 * to the UART when full (`chunk`), or the ring-3 line buffer (buf == 0). */
struct sink {
    char *buf;
    size_t n, pos;
    bool chunk;
};

static void put(struct sink *s, char ch)
{
    if (s->chunk) {
        s->buf[s->pos++] = ch;
        if (s->pos == s->n) {
            kit_ring0_write(s->buf, s->pos);
            s->pos = 0;
        }
        return;
    }
    if (s->buf) {
        if (s->pos + 1 < s->n)
            s->buf[s->pos] = ch;
    } else {
        emit(ch);
    }
    s->pos++;
}

static void fmt_num(struct sink *s, u64 v, unsigned base, bool neg, int width, bool zero)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (width-- > n)
        put(s, zero ? '0' : ' ');
    while (n)
        put(s, tmp[--n]);
}

static void vformat(struct sink *s, const char *f, __builtin_va_list ap)
{
    for (; *f; f++) {
        if (*f != '%') {
            put(s, *f);
            continue;
        }
        f++;
        bool zero = false;
        int width = 0, lng = 0;
        if (*f == '0') {
            zero = true;
            f++;
        }
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        while (*f == 'l' || *f == 'z') {
            lng++;
            f++;
        }
        switch (*f) {
        case 'd': {
            i64 v = lng ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
            fmt_num(s, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, zero);
            break;
        }
        case 'u':
            fmt_num(s, lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, false, width, zero);
            break;
        case 'x':
            fmt_num(s, lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16, false, width, zero);
            break;
        case 'p':
            put(s, '0');
            put(s, 'x');
            fmt_num(s, (u64)__builtin_va_arg(ap, void *), 16, false, width, zero);
            break;
        case 'c':
            put(s, (char)__builtin_va_arg(ap, int));
            break;
        case 's': {
            const char *str = __builtin_va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            int len = (int)strlen(str);
            while (width-- > len)
                put(s, ' ');
            while (*str)
                put(s, *str++);
            break;
        }
        case '%':
            put(s, '%');
            break;
        default:
            put(s, '%');
            if (*f)
                put(s, *f);
            else
                return;
        }
    }
}

void kit_vprintf(const char *fmt, __builtin_va_list ap)
{
    if (kit_cpl() == 3 && kit_this_cpu()) {
        struct sink s = {0, 0, 0, false};
        vformat(&s, fmt, ap);
        return;
    }
    /* Ring 0 (handlers, early boot): the whole message under the lock. */
    char chunk[128];
    struct sink s = {chunk, sizeof(chunk), 0, true};
    bool taken = lock_serial();
    vformat(&s, fmt, ap);
    if (s.pos)
        kit_ring0_write(chunk, s.pos);
    unlock_serial(taken);
}

void kit_printf(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    kit_vprintf(fmt, ap);
    __builtin_va_end(ap);
}

int kit_snprintf(char *buf, size_t n, const char *fmt, ...)
{
    struct sink s = {buf, n, 0, false};
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vformat(&s, fmt, ap);
    __builtin_va_end(ap);
    if (n)
        buf[s.pos < n ? s.pos : n - 1] = 0;
    return (int)s.pos;
}

/* ---- exit ---- */

void kit_exit(int code)
{
    kit_flush();
    outb(DEBUG_EXIT_PORT, (u8)code);
    kit_udelay(1000000); /* a VMM may take a moment to stop the vCPUs */
    /* No debug-exit device (e.g. another VMM): say so and reset through the i8042. */
    kit_printf("kit: debug-exit port 0x%x had no effect (code %d); resetting\n", DEBUG_EXIT_PORT, code);
    kit_flush();
    outb(0x64, 0xfe);
    kit_park();
}

void kit_fail(int code, const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    kit_vprintf(fmt, ap);
    __builtin_va_end(ap);
    kit_exit(code);
}

/* ---- command line: space-separated words, "key" or "key=value" ---- */

static const char *find_word(const char *key, size_t *vlen, bool need_value)
{
    const char *p = kit_boot.cmdline;
    size_t kl = strlen(key);
    if (!p)
        return NULL;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = p;
        while (*p && *p != ' ')
            p++;
        size_t wl = p - w;
        if (wl >= kl && !strncmp(w, key, kl)) {
            if (wl > kl && w[kl] == '=') {
                *vlen = wl - kl - 1;
                return w + kl + 1;
            }
            if (wl == kl && !need_value) {
                *vlen = 0;
                return w + kl;
            }
        }
    }
    return NULL;
}

const char *kit_cmdline_value(const char *key, size_t *len)
{
    size_t l;
    const char *v = find_word(key, &l, true);
    if (v && len)
        *len = l;
    return v;
}

bool kit_cmdline_flag(const char *key)
{
    size_t l;
    return find_word(key, &l, false) != NULL;
}

u64 kit_cmdline_u64(const char *key, u64 dflt, bool *bad)
{
    size_t l;
    const char *v = kit_cmdline_value(key, &l);
    if (bad)
        *bad = false;
    if (!v)
        return dflt;
    u64 r = 0;
    unsigned base = 10;
    size_t i = 0;
    if (l > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
        base = 16;
        i = 2;
    }
    if (i == l)
        goto invalid;
    for (; i < l; i++) {
        char ch = v[i];
        unsigned d;
        if (ch >= '0' && ch <= '9')
            d = ch - '0';
        else if (base == 16 && ch >= 'a' && ch <= 'f')
            d = ch - 'a' + 10;
        else if (base == 16 && ch >= 'A' && ch <= 'F')
            d = ch - 'A' + 10;
        else
            goto invalid;
        if (r > (~0UL - d) / base)
            goto invalid;
        r = r * base + d;
    }
    return r;
invalid:
    if (bad)
        *bad = true;
    return dflt;
}

/* ---- time ---- */

/* Ring 0: one (TSC, PIT channel 2 count) sample; retried until the pair was
 * read within `tight` TSC ticks, so a preempted vCPU does not skew it. */
static bool pit_sample(u64 *tsc, u32 *count, u64 tight)
{
    for (int i = 0; i < 50; i++) {
        u64 a = kit_rdtsc();
        outb(0x43, 0x80); /* latch counter 2 */
        u32 c = inb(0x42);
        c |= (u32)inb(0x42) << 8;
        u64 b = kit_rdtsc();
        if (b - a <= tight) {
            *tsc = a + (b - a) / 2;
            *count = c;
            return true;
        }
        tight += tight / 4;
    }
    return false;
}

/* Ring 0: TSC kHz from PIT channel 2 (mode 0 from 0xffff, ~55 ms): samples at
 * the start and after the count dropped by >= 30000 ticks (~25 ms). 0 if the
 * PIT does not count. */
static u64 pit_calibrate(u64 unused)
{
    (void)unused;
    outb(0x61, (inb(0x61) & ~0x02) & ~0x01); /* gate low */
    outb(0x43, 0xb0);                        /* counter 2, lobyte/hibyte, mode 0 */
    outb(0x42, 0xff);
    outb(0x42, 0xff);
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);  /* gate high: count */
    u64 t0, t1;
    u32 c0, c1;
    const u64 tight = 200000; /* ~0.1 ms at 2 GHz: a few emulated port reads */
    if (!pit_sample(&t0, &c0, tight))
        return 0;
    for (u32 polls = 0;; polls++) {
        if (!pit_sample(&t1, &c1, tight) || polls > 100000)
            return 0;
        if (c1 < c0 && c0 - c1 >= 30000)
            break;
    }
    return (t1 - t0) * 1193182 / (c0 - c1) / 1000;
}

u64 kit_tsc_khz(void)
{
    static u64 khz;
    if (khz)
        return khz;
    u32 a, b, c, d;
    kit_cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a >= 0x40000010) { /* hypervisor timing leaf (KVM/VMware): EAX = TSC kHz */
        kit_cpuid(0x40000010, 0, &a, &b, &c, &d);
        if (a)
            return khz = a;
    }
    kit_cpuid(0, 0, &a, &b, &c, &d);
    u32 max = a;
    if (max >= 0x15) {
        kit_cpuid(0x15, 0, &a, &b, &c, &d);
        if (a && b && c)
            return khz = (u64)c * b / a / 1000;
    }
    if (max >= 0x16) {
        kit_cpuid(0x16, 0, &a, &b, &c, &d);
        if (a & 0xffff)
            return khz = (u64)(a & 0xffff) * 1000;
    }
    u64 pit = kit_ring0_call(pit_calibrate, 0);
    return khz = pit ? pit : 2000000;
}

void kit_udelay(u64 us)
{
    u64 end = kit_rdtsc() + us * kit_tsc_khz() / 1000;
    while ((i64)(kit_rdtsc() - end) < 0)
        kit_pause();
}
