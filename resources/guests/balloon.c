/* balloon: a minimal virtio-mmio (version 2) balloon driver written from the
 * virtio 1.2 specification (§4.2 virtio-mmio, §2.7 split virtqueues, §5.5
 * balloon), running in ring 3 and polling (no interrupts).
 *
 * It follows the target (config num_pages), giving pages from the top of its
 * free RAM (each page gets a pattern first) and taking them back on deflate,
 * checking that every deflated page reads back as zero; reports statistics;
 * reports free pages; honours DEFLATE_ON_OOM; and, with bad=1, sends the
 * malformed input the device must survive. See README.md for options. */
#include "kit/kit.h"

#define VBASE 0xd0000000UL
#define MAGIC 0x74726976
/* virtio-mmio registers (§4.2.2) */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEAT 0x010
#define R_DEV_FEAT_SEL 0x014
#define R_DRV_FEAT 0x020
#define R_DRV_FEAT_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_STATUS 0x060
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_AVAIL_LO 0x090
#define R_AVAIL_HI 0x094
#define R_USED_LO 0x0a0
#define R_USED_HI 0x0a4
#define R_GEN 0x0fc
#define R_CONFIG 0x100
/* status bits (§2.1) */
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64
/* balloon features (§5.5.3) */
#define F_STATS_VQ 1
#define F_DEFLATE_ON_OOM 2
#define F_REPORTING 5
#define F_VERSION_1 32
/* descriptor flags */
#define D_NEXT 1
#define D_WRITE 2

#define PAGE 4096UL
#define QSZ 256
#define PFNS_PER_BUF 1024 /* one 4 KiB page of le32 PFNs */
#define NBUF 64

static u32 rd(u32 off) { return mmio_read32(VBASE + off); }
static void wr(u32 off, u32 v) { mmio_write32(VBASE + off, v); }
static void mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

struct desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct vq {
    u32 index;
    u16 size;
    struct desc *desc;
    volatile u16 *avail; /* flags, idx, ring[size], used_event */
    volatile u32 *used;  /* (flags|idx<<16), then {id, len} pairs */
    u16 avail_idx, last_used;
};

static struct vq vqs[4];
static u32 nvq;
static struct vq *inflateq, *deflateq, *statsq, *reportq;
static u64 features;
static bool bad_mode;

static u16 used_idx(struct vq *q) { return (u16)(q->used[0] >> 16); }

/* Put a chain starting at descriptor `head` on the available ring. */
static void post(struct vq *q, u16 head)
{
    q->avail[2 + (q->avail_idx % q->size)] = head;
    mb();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    mb();
}
static void notify(struct vq *q) { wr(R_QUEUE_NOTIFY, q->index); }

/* Poll the status register until the device sets DEVICE_NEEDS_RESET;
 * false after timeout_ms. */
static bool wait_needs_reset(u64 timeout_ms)
{
    u64 khz = kit_tsc_khz(), t0 = kit_rdtsc();
    while (!(rd(R_STATUS) & S_NEEDS_RESET)) {
        if ((kit_rdtsc() - t0) / khz > timeout_ms)
            return false;
        kit_udelay(1000);
    }
    return true;
}

/* Wait until the device used everything posted; returns false on timeout. */
static bool wait_used(struct vq *q, u64 timeout_ms)
{
    u64 khz = kit_tsc_khz(), t0 = kit_rdtsc();
    while (used_idx(q) != q->avail_idx) {
        if ((kit_rdtsc() - t0) / khz > timeout_ms)
            return false;
        kit_pause();
    }
    q->last_used = q->avail_idx;
    return true;
}

static void *zalloc(u64 n)
{
    void *p = kit_alloc((n + PAGE - 1) & ~(PAGE - 1), PAGE);
    memset(p, 0, n);
    return p;
}

static bool setup_queue(struct vq *q, u32 index, u32 size)
{
    wr(R_QUEUE_SEL, index);
    if (rd(R_QUEUE_READY)) {
        kit_printf("balloon: FAIL queue %u already ready\n", index);
        return false;
    }
    u32 max = rd(R_QUEUE_NUM_MAX);
    if (max == 0) {
        kit_printf("balloon: FAIL queue %u does not exist\n", index);
        return false;
    }
    if (size > max)
        size = max;
    q->index = index;
    q->size = (u16)size;
    q->desc = zalloc(16UL * size);
    q->avail = zalloc(6 + 2UL * size);
    q->used = zalloc(6 + 8UL * size);
    q->avail_idx = q->last_used = 0;
    if (bad_mode && index == 1) {
        /* Queue sizes out of spec: not a power of 2, above the maximum, 0. */
        wr(R_QUEUE_NUM, 3);
        wr(R_QUEUE_NUM, max * 2);
        wr(R_QUEUE_NUM, 0);
        /* Rings outside guest RAM: QueueReady must stay 0. */
        wr(R_QUEUE_NUM, size);
        wr(R_DESC_LO, 0xe0000000u);
        wr(R_DESC_HI, 0);
        wr(R_QUEUE_READY, 1);
        if (rd(R_QUEUE_READY)) {
            kit_printf("balloon: FAIL device accepted a descriptor table outside RAM\n");
            return false;
        }
        kit_printf("balloon: bad qsize+ring rejected\n");
    }
    wr(R_QUEUE_NUM, size);
    wr(R_DESC_LO, (u32)(u64)q->desc);
    wr(R_DESC_HI, (u32)((u64)q->desc >> 32));
    wr(R_AVAIL_LO, (u32)(u64)q->avail);
    wr(R_AVAIL_HI, (u32)((u64)q->avail >> 32));
    wr(R_USED_LO, (u32)(u64)q->used);
    wr(R_USED_HI, (u32)((u64)q->used >> 32));
    wr(R_QUEUE_READY, 1);
    if (rd(R_QUEUE_READY) != 1) {
        kit_printf("balloon: FAIL queue %u not ready\n", index);
        return false;
    }
    return true;
}

/* §3.1.1 driver initialization. */
static bool init_device(void)
{
    if (rd(R_MAGIC) != MAGIC || rd(R_VERSION) != 2 || rd(R_DEVICE_ID) != 5) {
        kit_printf("balloon: FAIL no virtio-mmio v2 balloon at 0x%lx (magic 0x%x version %u id %u)\n", VBASE,
                   rd(R_MAGIC), rd(R_VERSION), rd(R_DEVICE_ID));
        return false;
    }
    wr(R_STATUS, 0);
    wr(R_STATUS, S_ACK);
    wr(R_STATUS, S_ACK | S_DRIVER);
    wr(R_DEV_FEAT_SEL, 0);
    u64 offered = rd(R_DEV_FEAT);
    wr(R_DEV_FEAT_SEL, 1);
    offered |= (u64)rd(R_DEV_FEAT) << 32;
    u64 want = (1UL << F_VERSION_1) | (1UL << F_STATS_VQ) | (1UL << F_DEFLATE_ON_OOM) | (1UL << F_REPORTING);
    features = offered & want;
    if (!(features & (1UL << F_VERSION_1))) {
        kit_printf("balloon: FAIL device does not offer VERSION_1\n");
        return false;
    }
    wr(R_DRV_FEAT_SEL, 0);
    wr(R_DRV_FEAT, (u32)features);
    wr(R_DRV_FEAT_SEL, 1);
    wr(R_DRV_FEAT, (u32)(features >> 32));
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(rd(R_STATUS) & S_FEATURES_OK)) {
        kit_printf("balloon: FAIL FEATURES_OK not accepted\n");
        return false;
    }
    nvq = 0;
    inflateq = &vqs[nvq];
    if (!setup_queue(&vqs[nvq], nvq, QSZ))
        return false;
    nvq++;
    deflateq = &vqs[nvq];
    if (!setup_queue(&vqs[nvq], nvq, QSZ))
        return false;
    nvq++;
    statsq = reportq = NULL;
    if (features & (1UL << F_STATS_VQ)) {
        statsq = &vqs[nvq];
        if (!setup_queue(&vqs[nvq], nvq, QSZ))
            return false;
        nvq++;
    }
    if (features & (1UL << F_REPORTING)) {
        reportq = &vqs[nvq];
        if (!setup_queue(&vqs[nvq], nvq, QSZ))
            return false;
        nvq++;
    }
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    kit_printf("balloon: features=0x%lx stats=%d deflate_on_oom=%d reporting=%d queues=%u\n", features,
               statsq != NULL, !!(features & (1UL << F_DEFLATE_ON_OOM)), reportq != NULL, nvq);
    return true;
}

/* Config space read with the generation check of §4.2.2.2. */
static u32 cfg_read(u32 off)
{
    u32 g, v;
    do {
        g = rd(R_GEN);
        v = rd(R_CONFIG + off);
    } while (rd(R_GEN) != g);
    return v;
}

/* ---- guest memory bookkeeping ---- */
static u64 pool_lo, pool_hi;  /* free RAM the driver manages, page aligned */
static u64 nb;                /* pages in the balloon: [pool_hi - nb*PAGE, pool_hi) */
static u64 used_lo;           /* pages [pool_lo, used_lo) are in use by the "workload" */
static u32 *pfnbuf[NBUF];
static u64 touched_pages, zero_checked, deflated_total, inflated_total;

static u64 pool_pages(void) { return (pool_hi - pool_lo) / PAGE; }
static u64 free_pages(void) { return pool_pages() - nb - (used_lo - pool_lo) / PAGE; }

static void touch(u64 pa, u64 tag)
{
    volatile u64 *p = (volatile u64 *)pa;
    p[0] = tag ^ 0x5aa5f00dUL;
    p[511] = ~tag;
    touched_pages++;
}

static bool page_is_zero(u64 pa, bool full)
{
    volatile u64 *p = (volatile u64 *)pa;
    if (!full)
        return p[0] == 0 && p[511] == 0;
    for (int i = 0; i < 512; i++)
        if (p[i])
            return false;
    return true;
}

/* Send `n` PFNs starting at `first` going down (descending like Linux) on
 * queue q, NBUF buffers per notification. */
static bool send_pfns(struct vq *q, u64 top_pfn, u64 n)
{
    u64 done = 0;
    while (done < n) {
        u32 nbufs = 0;
        while (done < n && nbufs < NBUF && nbufs < q->size) {
            u32 k = 0;
            while (done < n && k < PFNS_PER_BUF)
                pfnbuf[nbufs][k++] = (u32)(top_pfn - done++);
            u16 d = (u16)((q->avail_idx) % q->size);
            q->desc[d].addr = (u64)pfnbuf[nbufs];
            q->desc[d].len = k * 4;
            q->desc[d].flags = 0;
            q->desc[d].next = 0;
            post(q, d);
            nbufs++;
        }
        notify(q);
        if (!wait_used(q, 10000)) {
            kit_printf("balloon: FAIL device did not return %s buffers\n", q == inflateq ? "inflate" : "deflate");
            return false;
        }
    }
    return true;
}

static bool inflate(u64 n)
{
    u64 top = pool_hi / PAGE - nb - 1;
    for (u64 i = 0; i < n; i++)
        touch((top - i) * PAGE, top - i);
    u64 t0 = kit_rdtsc();
    if (!send_pfns(inflateq, top, n))
        return false;
    u64 us = (kit_rdtsc() - t0) * 1000 / kit_tsc_khz();
    nb += n;
    inflated_total += n;
    wr(R_CONFIG + 4, (u32)nb);
    kit_printf("balloon: inflated pages=%lu actual=%lu us=%lu\n", n, nb, us);
    return true;
}

/* Deflate n pages (the lowest ballooned ones), then check they read zero and
 * use them again. */
static bool deflate(u64 n, const char *why)
{
    u64 low = pool_hi / PAGE - nb;
    u64 t0 = kit_rdtsc();
    if (!send_pfns(deflateq, low + n - 1, n))
        return false;
    u64 us = (kit_rdtsc() - t0) * 1000 / kit_tsc_khz();
    nb -= n;
    deflated_total += n;
    wr(R_CONFIG + 4, (u32)nb);
    for (u64 i = 0; i < n; i++) {
        u64 pa = (low + i) * PAGE;
        if (!page_is_zero(pa, i % 64 == 0)) {
            kit_printf("balloon: FAIL deflated page 0x%lx is not zero (0x%lx)\n", pa, *(volatile u64 *)pa);
            return false;
        }
        zero_checked++;
    }
    for (u64 i = 0; i < n; i++)
        touch((low + i) * PAGE, low + i);
    kit_printf("balloon: deflated pages=%lu actual=%lu us=%lu zero_ok (%s)\n", n, nb, us, why);
    return true;
}

/* ---- statistics (§5.5.6.3) ---- */
struct stat {
    u16 tag;
    u64 val;
} __attribute__((packed));
static struct stat *statbuf;
static u64 stats_sent;

static void post_stats(void)
{
    u64 v[10] = {0, 0, 0, touched_pages, free_pages() * PAGE, kit_boot.ram_bytes,
                 (free_pages() + nb) * PAGE, 0, 0, 0};
    for (u16 t = 0; t < 10; t++) {
        statbuf[t].tag = t;
        statbuf[t].val = v[t];
    }
    struct desc *d = &statsq->desc[0];
    d->addr = (u64)statbuf;
    d->len = sizeof(struct stat) * 10;
    d->flags = 0;
    post(statsq, 0);
    notify(statsq);
    stats_sent++;
}

static void service_stats(void)
{
    if (statsq && used_idx(statsq) != statsq->last_used) {
        statsq->last_used = used_idx(statsq);
        post_stats();
    }
}

/* ---- free page reporting ---- */
static bool report_free(u64 mib)
{
    u64 lo = used_lo, n = mib << 8;
    if (n > free_pages()) {
        kit_printf("balloon: FAIL report_mib=%lu is more than free memory\n", mib);
        return false;
    }
    for (u64 i = 0; i < n; i++)
        touch(lo + i * PAGE, i);
    kit_printf("balloon: report touched pages=%lu\n", n);
    kit_udelay(kit_cmdline_u64("report_delay_ms", 1500, NULL) * 1000);
    /* Chains of up to 32 descriptors of 2 MiB each, device-writable like Linux. */
    u64 chunk = 512, done = 0;
    while (done < n) {
        u16 head = (u16)(reportq->avail_idx * 32 % reportq->size), k = 0;
        while (done < n && k < 32) {
            u64 len = n - done < chunk ? n - done : chunk;
            struct desc *d = &reportq->desc[head + k];
            d->addr = lo + done * PAGE;
            d->len = (u32)(len * PAGE);
            d->flags = D_WRITE;
            d->next = head + k + 1;
            done += len;
            k++;
        }
        reportq->desc[head + k - 1].flags = D_WRITE;
        for (u16 j = 0; j + 1 < k; j++)
            reportq->desc[head + j].flags |= D_NEXT;
        post(reportq, head);
        notify(reportq);
        if (!wait_used(reportq, 10000)) {
            kit_printf("balloon: FAIL reporting buffer not returned\n");
            return false;
        }
    }
    kit_printf("balloon: reported pages=%lu ram_bytes=%lu\n", n, kit_boot.ram_bytes);
    /* Give the host time to look at its RSS before reading them again. */
    kit_udelay(kit_cmdline_u64("report_delay_ms", 1500, NULL) * 1000);
    for (u64 i = 0; i < n; i++)
        if (!page_is_zero(lo + i * PAGE, i % 64 == 0)) {
            kit_printf("balloon: FAIL reported page 0x%lx not zero\n", lo + i * PAGE);
            return false;
        }
    kit_printf("balloon: reported pages read back zero_ok\n");
    return true;
}

/* ---- bad guest input (bad=1): each case, then proof the device still works ---- */
static bool send_raw(struct vq *q, u64 addr, u32 len, u16 flags, u16 next)
{
    u16 d = (u16)(q->avail_idx % q->size);
    q->desc[d].addr = addr;
    q->desc[d].len = len;
    q->desc[d].flags = flags;
    q->desc[d].next = next == 0xffff ? d : next;
    post(q, d);
    notify(q);
    if (!wait_used(q, 5000)) {
        kit_printf("balloon: FAIL buffer (addr 0x%lx len %u flags %u) not returned\n", addr, len, flags);
        return false;
    }
    return true;
}

static bool send_list(struct vq *q, const u32 *pfns, u32 n)
{
    memcpy(pfnbuf[0], pfns, n * 4);
    return send_raw(q, (u64)pfnbuf[0], n * 4, 0, 0);
}

static bool bad_input(void)
{
    u32 top = (u32)(pool_hi / PAGE - 1), a = top, b = top - 1, c = top - 2;
    u32 past = (u32)(kit_boot.ram_top / PAGE + 16);
    touch((u64)a * PAGE, a);
    touch((u64)b * PAGE, b);
    u32 l1[] = {0xd0000, past, a};
    if (!send_list(inflateq, l1, 3))
        return false;
    kit_printf("balloon: bad pfn_out_of_ram sent\n");
    u32 l2[] = {b, b};
    u32 l3[] = {a};
    if (!send_list(inflateq, l2, 2) || !send_list(inflateq, l3, 1))
        return false;
    kit_printf("balloon: bad duplicate_pfn sent\n");
    u32 l4[] = {c, a};
    if (!send_list(deflateq, l4, 2))
        return false;
    if (!page_is_zero((u64)a * PAGE, true)) {
        kit_printf("balloon: FAIL deflated page 0x%lx not zero\n", (u64)a * PAGE);
        return false;
    }
    kit_printf("balloon: bad deflate_never_inflated sent; deflated page zero_ok\n");
    if (!send_raw(inflateq, 0xe0000000UL, 16, 0, 0) || !send_raw(inflateq, kit_boot.ram_top - 8, 16, 0, 0))
        return false;
    kit_printf("balloon: bad descriptor_out_of_ram sent\n");
    pfnbuf[0][0] = c;
    if (!send_raw(inflateq, (u64)pfnbuf[0], 4, D_WRITE, 0) || !send_raw(inflateq, (u64)pfnbuf[0], 6, 0, 0))
        return false;
    kit_printf("balloon: bad descriptor_direction_and_length sent\n");
    if (!send_raw(inflateq, (u64)pfnbuf[0], 4, D_NEXT, 0xffff) ||
        !send_raw(inflateq, (u64)pfnbuf[0], 4, D_NEXT, inflateq->size + 5))
        return false;
    kit_printf("balloon: bad malformed_chain sent\n");
    u32 l5[] = {b};
    if (!send_list(deflateq, l5, 1) || !page_is_zero((u64)b * PAGE, true)) {
        kit_printf("balloon: FAIL valid deflate after bad input\n");
        return false;
    }
    kit_printf("balloon: valid deflate after bad input zero_ok\n");
    /* Available index moved past the queue size: the device must ask for a reset. */
    inflateq->avail_idx += inflateq->size + 7;
    inflateq->avail[1] = inflateq->avail_idx;
    mb();
    notify(inflateq);
    if (!wait_needs_reset(5000)) {
        kit_printf("balloon: FAIL device did not set DEVICE_NEEDS_RESET after a bad avail index\n");
        return false;
    }
    wr(R_INT_ACK, rd(R_INT_STATUS));
    kit_printf("balloon: bad avail_index -> needs reset\n");
    bad_mode = false;
    if (!init_device())
        return false;
    if (statsq)
        post_stats();
    touch((u64)a * PAGE, a);
    if (!send_list(inflateq, l3, 1) || !send_list(deflateq, l3, 1) || !page_is_zero((u64)a * PAGE, true)) {
        kit_printf("balloon: FAIL inflate/deflate after reset\n");
        return false;
    }
    kit_printf("balloon: bad input done; device works after reset\n");
    return true;
}

/* ring_poison=1: name the inflate queue's descriptor-table page, wait for a
 * line (the host poisons that page meanwhile), then notify the queue without
 * touching the page again: the device must refuse the queue and ask for a
 * reset (DEVICE_NEEDS_RESET) instead of the VMM dying on the poisoned page;
 * then wait for one more line and exit 0. */
static int ring_poison(void)
{
    /* One inflate buffer (an empty PFN list) posted but not notified: the
     * device will have to read the descriptor from the poisoned page. */
    struct desc *d = &inflateq->desc[inflateq->avail_idx % inflateq->size];
    d->addr = (u64)pfnbuf[0];
    d->len = 0;
    d->flags = 0;
    d->next = 0;
    post(inflateq, (u16)(d - inflateq->desc));
    kit_printf("balloon: ring_poison desc=0x%lx waiting\n", (u64)inflateq->desc);
    while (kit_serial_getc() != '\n')
        ;
    notify(inflateq);
    if (!wait_needs_reset(10000)) {
        kit_printf("balloon: FAIL no DEVICE_NEEDS_RESET after a poisoned ring page\n");
        return KIT_EXIT_FAIL;
    }
    kit_printf("balloon: ring_poison needs_reset; waiting\n");
    while (kit_serial_getc() != '\n')
        ;
    return 0;
}

int guest_main(void)
{
    bad_mode = kit_cmdline_flag("bad");
    if (!init_device())
        return KIT_EXIT_FAIL;
    for (int i = 0; i < NBUF; i++)
        pfnbuf[i] = kit_alloc(PAGE, PAGE);
    statbuf = kit_alloc(PAGE, PAGE);
    /* Free RAM: from the heap end (plus slack for later allocations) to the
     * end of the RAM range that contains it. */
    pool_lo = (kit_heap_end() + (1UL << 20) + PAGE - 1) & ~(PAGE - 1);
    for (u32 i = 0; i < kit_boot.nr_e820; i++) {
        const struct kit_e820 *e = &kit_boot.e820[i];
        if (e->type == 1 && e->addr <= pool_lo && pool_lo < e->addr + e->size)
            pool_hi = (e->addr + e->size) & ~(PAGE - 1);
    }
    used_lo = pool_lo;
    kit_printf("balloon: pool 0x%lx-0x%lx pages=%lu\n", pool_lo, pool_hi, pool_pages());
    if (kit_cmdline_flag("ring_poison"))
        return ring_poison();
    if (statsq)
        post_stats();
    if (bad_mode && !bad_input())
        return KIT_EXIT_FAIL;
    if (kit_cmdline_flag("touch")) {
        for (u64 pa = pool_lo; pa < pool_hi; pa += PAGE)
            touch(pa, pa);
        kit_printf("balloon: touched pages=%lu\n", pool_pages());
    }
    u64 report_mib = kit_cmdline_u64("report_mib", 0, NULL);
    if (report_mib) {
        if (!reportq) {
            kit_printf("balloon: FAIL report_mib needs free_page_reporting\n");
            return KIT_EXIT_FAIL;
        }
        if (!report_free(report_mib))
            return KIT_EXIT_FAIL;
    }
    u64 oom_mib = kit_cmdline_u64("oom_mib", 0, NULL);
    bool oom_done = false;
    u32 gen = ~0u, target = 0;
    bool working = false, capped = false;
    kit_printf("balloon: ready\n");
    for (;;) {
        u32 g = rd(R_GEN);
        if (g != gen) {
            gen = g;
            target = cfg_read(0);
            working = true;
            capped = false;
            if (rd(R_STATUS) & S_NEEDS_RESET) {
                kit_printf("balloon: FAIL device needs reset\n");
                return KIT_EXIT_FAIL;
            }
        }
        if (working) {
            u64 reserve = 1024; /* keep 4 MiB for the workload */
            u64 max_nb = pool_pages() - (used_lo - pool_lo) / PAGE - reserve;
            u64 want = target > max_nb ? max_nb : target;
            if (want != target && !capped) {
                kit_printf("balloon: target %u pages exceeds free memory; capped at %lu\n", target, max_nb);
                capped = true;
            }
            if (want > nb) {
                if (!inflate(want - nb))
                    return KIT_EXIT_FAIL;
            } else if (want < nb) {
                if (!deflate(nb - want, "target"))
                    return KIT_EXIT_FAIL;
                /* Use the pages again: they must be fresh zeroed frames. */
            } else {
                working = false;
                kit_printf("balloon: at target pages=%lu\n", nb);
            }
        }
        if (oom_mib && !oom_done && !working && nb > 0) {
            /* Memory pressure: the workload wants more than is free. */
            oom_done = true;
            u64 need = oom_mib << 8;
            kit_printf("balloon: oom need_pages=%lu free_pages=%lu\n", need, free_pages());
            if (!(features & (1UL << F_DEFLATE_ON_OOM))) {
                kit_printf("balloon: oom deflate_on_oom not negotiated; balloon kept at %lu pages\n", nb);
            } else {
                if (need > nb)
                    need = nb;
                if (!deflate(need, "oom"))
                    return KIT_EXIT_FAIL;
                kit_printf("balloon: oom deflated pages=%lu actual=%lu target=%u\n", need, nb, target);
            }
        }
        service_stats();
        kit_udelay(2000);
    }
}
