/* demo: the embedded default guest. Reports vCPUs (MP table) and RAM (e820),
 * starts every AP (each reports in), runs a ring-3 memory pattern test over
 * all RAM above the image, exits 0. Options: memtest_mib=N (limit; 0 = skip). */
#include "kit/kit.h"

static const char *e820_type(u32 t)
{
    return t == 1 ? "ram" : t == 2 ? "reserved" : t == 3 ? "acpi" : t == 4 ? "nvs" : t == 5 ? "unusable" : "other";
}

static int memtest(u64 limit_bytes)
{
    const u64 pat = 0xa5a5a5a55a5a5a5aUL;
    u64 lo = kit_heap_end(), tested = 0, t[3];
    t[0] = kit_rdtsc();
    for (int pass = 0; pass < 2; pass++) {
        if (pass)
            t[1] = kit_rdtsc();
        u64 budget = limit_bytes;
        for (u32 i = 0; i < kit_boot.nr_e820; i++) {
            const struct kit_e820 *e = &kit_boot.e820[i];
            if (e->type != 1)
                continue;
            u64 s = e->addr > lo ? e->addr : lo, end = e->addr + e->size;
            s = (s + 7) & ~7UL;
            end &= ~7UL;
            if (end <= s)
                continue;
            if (end - s > budget)
                end = s + budget;
            budget -= end - s;
            volatile u64 *p = (volatile u64 *)s, *q = (volatile u64 *)end;
            if (pass == 0) {
                for (; p < q; p++)
                    *p = (u64)p ^ pat;
                tested += end - s;
            } else {
                for (; p < q; p++) {
                    u64 v = *p;
                    if (v != ((u64)p ^ pat)) {
                        kit_printf("memtest: FAIL at 0x%lx wrote 0x%lx read 0x%lx\n", (u64)p, (u64)p ^ pat, v);
                        return KIT_EXIT_MEMTEST;
                    }
                }
            }
        }
    }
    t[2] = kit_rdtsc();
    u64 khz = kit_tsc_khz();
    kit_printf("memtest: ok mib=%lu\n", tested >> 20);
    kit_printf("memtest: range_start=0x%lx write_ms=%lu read_ms=%lu tsc_khz=%lu\n", lo, (t[1] - t[0]) / khz,
               (t[2] - t[1]) / khz, khz);
    return 0;
}

int guest_main(void)
{
    kit_printf("demo: test-guest kit demo guest (cmdline \"%s\")\n", kit_boot.cmdline);
    for (u32 i = 0; i < kit_boot.nr_e820; i++) {
        const struct kit_e820 *e = &kit_boot.e820[i];
        kit_printf("demo: e820 0x%lx-0x%lx %s\n", e->addr, e->addr + e->size, e820_type(e->type));
    }
    u64 mib = (kit_boot.ram_bytes + (1 << 20) - 1) >> 20;
    kit_printf("demo: vcpus=%u mem_mib=%lu\n", kit_boot.nr_cpus, mib);
    u32 online = kit_start_aps();
    kit_printf("demo: online=%u\n", online);
    if (online != kit_boot.nr_cpus) {
        kit_printf("demo: FAIL only %u of %u vcpus online\n", online, kit_boot.nr_cpus);
        return KIT_EXIT_SMP;
    }
    bool bad;
    u64 limit = kit_cmdline_u64("memtest_mib", ~0UL >> 20, &bad);
    if (bad) {
        kit_printf("demo: FAIL bad memtest_mib= value (want a number of MiB)\n");
        return KIT_EXIT_CMDLINE;
    }
    if (limit) {
        int r = memtest(limit << 20);
        if (r)
            return r;
    } else {
        kit_printf("memtest: skipped\n");
    }
    kit_printf("demo: ok\n");
    return 0;
}
