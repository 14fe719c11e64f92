/* Test-guest kit: boot_params (e820, command line) and Intel MP table parsing (ring 3). */
#include "kit.h"

static u8 sum8(const u8 *p, size_t n)
{
    u8 s = 0;
    while (n--)
        s += *p++;
    return s;
}

static const u8 *find_mpf(u64 start, u64 len)
{
    for (u64 a = start; a + 16 <= start + len; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' && p[8] == 1 && sum8(p, 16) == 0)
            return p;
    }
    return NULL;
}

static void parse_mptable(void)
{
    u64 bda = 0x40e; /* BIOS data area: EBDA segment */
    __asm__("" : "+r"(bda));
    u64 ebda = (u64)(*(const u16 *)bda) << 4;
    const u8 *mpf = NULL;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        mpf = find_mpf(ebda, 1024);
    if (!mpf)
        mpf = find_mpf(0x9fc00, 1024);
    if (!mpf)
        mpf = find_mpf(0xf0000, 0x10000);
    if (!mpf)
        kit_fail(KIT_EXIT_BOOT, "kit: FAIL no MP floating pointer (\"_MP_\") found at 0x9fc00/EBDA/0xf0000\n");
    u32 cfg_addr = *(const u32 *)(mpf + 4);
    if (!cfg_addr)
        kit_fail(KIT_EXIT_BOOT, "kit: FAIL MP floating pointer at %p uses a default configuration (unsupported)\n", mpf);
    const u8 *cfg = (const u8 *)(u64)cfg_addr;
    u16 len = *(const u16 *)(cfg + 4);
    if (memcmp(cfg, "PCMP", 4) || len < 44 || sum8(cfg, len) != 0)
        kit_fail(KIT_EXIT_BOOT, "kit: FAIL bad MP configuration table at 0x%x (signature/length/checksum)\n", cfg_addr);
    u16 count = *(const u16 *)(cfg + 34);
    const u8 *e = cfg + 44, *end = cfg + len;
    u32 n = 1; /* slot 0 is the BSP */
    bool have_bsp = false;
    for (u16 i = 0; i < count && e < end; i++) {
        if (e[0] == 0) { /* processor */
            if (e[3] & 1) {
                if (e[3] & 2) {
                    kit_boot.apic_ids[0] = e[1];
                    have_bsp = true;
                } else if (n < KIT_MAX_CPUS) {
                    kit_boot.apic_ids[n++] = e[1];
                }
            }
            e += 20;
        } else if (e[0] <= 4) {
            e += 8;
        } else {
            kit_fail(KIT_EXIT_BOOT, "kit: FAIL unknown MP table entry type %u\n", e[0]);
        }
    }
    if (!have_bsp)
        kit_fail(KIT_EXIT_BOOT, "kit: FAIL MP table has no enabled bootstrap processor entry\n");
    kit_boot.nr_cpus = n;
}

void kit_boot_parse(void)
{
    const u8 *bp = (const u8 *)kit_boot.boot_params;
    u32 n = bp[0x1e8];
    if (n > KIT_MAX_E820)
        n = KIT_MAX_E820;
    kit_boot.nr_e820 = n;
    for (u32 i = 0; i < n; i++) {
        const u8 *e = bp + 0x2d0 + 20 * i;
        struct kit_e820 *d = &kit_boot.e820[i];
        d->addr = *(const u64 *)e;
        d->size = *(const u64 *)(e + 8);
        d->type = *(const u32 *)(e + 16);
        if (d->type == 1) {
            kit_boot.ram_bytes += d->size;
            if (d->addr + d->size > kit_boot.ram_top)
                kit_boot.ram_top = d->addr + d->size;
        }
    }
    if (!n)
        kit_fail(KIT_EXIT_BOOT, "kit: FAIL boot_params at 0x%lx has an empty e820 table\n", kit_boot.boot_params);

    u32 cmd = *(const u32 *)(bp + 0x228);
    u32 cmd_size = *(const u32 *)(bp + 0x238);
    static char cmdline[2048];
    if (cmd) {
        const char *src = (const char *)(u64)cmd;
        size_t i = 0, max = cmd_size && cmd_size < sizeof(cmdline) ? cmd_size : sizeof(cmdline) - 1;
        for (; i < max && src[i]; i++)
            cmdline[i] = src[i] == '\t' || src[i] == '\n' ? ' ' : src[i];
        cmdline[i] = 0;
    }
    kit_boot.cmdline = cmdline;
    parse_mptable();
}
