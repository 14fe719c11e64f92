/* smp: every vCPU reports in, then all of them increment one shared counter
 * (lock xadd) iterations=N times each (default 100000); the BSP checks the
 * total and that the fetched values were all distinct (their sum). */
#include "kit/kit.h"

static volatile u32 go, done;
static volatile u64 counter;
static volatile u64 ticket_sum;
static u64 iterations;

static void work(void)
{
    u64 sum = 0;
    for (u64 i = 0; i < iterations; i++)
        sum += __atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&ticket_sum, sum, __ATOMIC_SEQ_CST);
}

void guest_ap_main(struct kit_cpu *cpu)
{
    (void)cpu;
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
        kit_pause();
    work();
    __atomic_fetch_add(&done, 1, __ATOMIC_SEQ_CST);
}

int guest_main(void)
{
    bool bad;
    iterations = kit_cmdline_u64("iterations", 100000, &bad);
    if (bad || iterations > (1UL << 32)) {
        kit_printf("smp: FAIL bad iterations= value (want 0..2^32)\n");
        return KIT_EXIT_CMDLINE;
    }
    kit_printf("smp: vcpus=%u iterations=%lu\n", kit_boot.nr_cpus, iterations);
    u32 n = kit_start_aps();
    if (n != kit_boot.nr_cpus) {
        kit_printf("smp: FAIL only %u of %u vcpus online\n", n, kit_boot.nr_cpus);
        return KIT_EXIT_SMP;
    }
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    work();
    u64 t0 = kit_rdtsc();
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) != n - 1) {
        if (kit_rdtsc() - t0 > 60000 * kit_tsc_khz()) {
            kit_printf("smp: FAIL only %u of %u APs finished within 60 s\n", done, n - 1);
            return KIT_EXIT_SMP;
        }
        kit_pause();
    }
    u64 total = (u64)n * iterations, expect_sum = total ? total * (total - 1) / 2 : 0;
    if (counter != total || ticket_sum != expect_sum) {
        kit_printf("smp: FAIL counter=%lu expected=%lu ticket_sum=%lu expected_sum=%lu\n", counter, total, ticket_sum,
                   expect_sum);
        return KIT_EXIT_SMP;
    }
    kit_printf("smp: ok counter=%lu vcpus=%u\n", counter, n);
    return 0;
}
