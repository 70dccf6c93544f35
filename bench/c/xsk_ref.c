/* Reference AF_XDP consumer for bench/datapath.py: the same RX sink and TX blaster as the Python client
 * library's bulk loops (recycle_rx / resend+kick+reap), written in C against libxdp's xsk.h, so the
 * library's packet rates can be given as a fraction of what a native consumer gets on the same veth.
 *
 *   xsk_ref rx|tx IFNAME QUEUE XSKMAP_FD SECONDS [FRAME_HEX]
 *
 * It makes its own UMEM and socket (libxdp's program loading inhibited) and puts the socket into the
 * XSK map whose fd it inherited, the slot the broker's program redirects QUEUE to. Ring sizes are those
 * of datapath.GEOMETRY. Prints one JSON object: {"mode": ..., "packets": N, "seconds": S, "pps": R}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <xdp/xsk.h>

#define UMEM_SIZE (32u << 20)
#define FRAME_SIZE 4096u
#define FILL_SIZE 8192u
#define COMP_SIZE 4096u
#define RX_SIZE 8192u
#define TX_SIZE 2048u
#define WARMUP_S 0.2

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, int err)
{
	fprintf(stderr, "xsk_ref: %s: %s\n", what, strerror(err < 0 ? -err : err));
	exit(1);
}

struct ctx {
	struct xsk_ring_prod fill, tx;
	struct xsk_ring_cons comp, rx;
	struct xsk_umem *umem;
	struct xsk_socket *xsk;
	void *area;
};

static void open_socket(struct ctx *c, const char *ifname, unsigned int queue, int map_fd)
{
	struct xsk_umem_config ucfg = {
		.fill_size = FILL_SIZE, .comp_size = COMP_SIZE, .frame_size = FRAME_SIZE, .frame_headroom = 0,
	};
	struct xsk_socket_config scfg = {
		.rx_size = RX_SIZE, .tx_size = TX_SIZE,
		.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD, .bind_flags = XDP_USE_NEED_WAKEUP,
	};
	int err;

	c->area = mmap(NULL, UMEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (c->area == MAP_FAILED)
		die("mmap", errno);
	err = xsk_umem__create(&c->umem, c->area, UMEM_SIZE, &c->fill, &c->comp, &ucfg);
	if (err)
		die("xsk_umem__create", err);
	err = xsk_socket__create(&c->xsk, ifname, queue, c->umem, &c->rx, &c->tx, &scfg);
	if (err)
		die("xsk_socket__create", err);
	err = xsk_socket__update_xskmap(c->xsk, map_fd);
	if (err)
		die("xsk_socket__update_xskmap", err);
}

/* Every frame but the TX ones goes to the fill ring once; received frames go straight back to it. */
static double rx(struct ctx *c, double seconds, unsigned long *packets)
{
	unsigned int nframes = UMEM_SIZE / FRAME_SIZE, n = nframes < FILL_SIZE ? nframes : FILL_SIZE, idx, i;
	unsigned long got = 0;
	double start = 0, end = now() + WARMUP_S;
	int counting = 0;

	if (xsk_ring_prod__reserve(&c->fill, n, &idx) != n)
		die("fill ring", EAGAIN);
	for (i = 0; i < n; i++)
		*xsk_ring_prod__fill_addr(&c->fill, idx + i) = (uint64_t)i * FRAME_SIZE;
	xsk_ring_prod__submit(&c->fill, n);
	for (;;) {
		unsigned int ridx, fidx, k;
		double t;

		n = xsk_ring_cons__peek(&c->rx, RX_SIZE, &ridx);
		if (n) {
			/* the fill ring has room for every frame the rx ring holds: both hold all frames at most */
			while (xsk_ring_prod__reserve(&c->fill, n, &fidx) != n)
				;
			for (k = 0; k < n; k++)
				*xsk_ring_prod__fill_addr(&c->fill, fidx + k) = xsk_ring_cons__rx_desc(&c->rx, ridx + k)->addr;
			xsk_ring_prod__submit(&c->fill, n);
			xsk_ring_cons__release(&c->rx, n);
			got += n;
		} else if (xsk_ring_prod__needs_wakeup(&c->fill)) {
			recvfrom(xsk_socket__fd(c->xsk), NULL, 0, MSG_DONTWAIT, NULL, NULL);
		}
		t = now(); /* vDSO: a few ns, as the Python loop's time.monotonic() each batch */

		if (t >= end) {
			if (counting)
				break;
			counting = 1, got = 0, start = t, end = t + seconds;
		}
	}
	*packets = got;
	return now() - start;
}

static int hexval(char ch)
{
	return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* Every TX slot points at a frame of its own holding FRAME; whole batches are published again as the
 * completions come back. */
static double tx(struct ctx *c, const char *hex, double seconds, unsigned long *packets)
{
	unsigned int len = strlen(hex) / 2, idx, i, n;
	unsigned char frame[FRAME_SIZE];
	unsigned long sent = 0;
	double start, end;

	if (!len || len > FRAME_SIZE || strlen(hex) % 2)
		die("frame", EINVAL);
	for (i = 0; i < len; i++) {
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);

		if (hi < 0 || lo < 0)
			die("frame", EINVAL);
		frame[i] = hi << 4 | lo;
	}
	for (i = 0; i < TX_SIZE; i++)
		memcpy((char *)c->area + (uint64_t)i * FRAME_SIZE, frame, len);
	start = now();
	end = start + seconds;
	while (now() < end) {
		unsigned int cidx;

		n = xsk_prod_nb_free(&c->tx, TX_SIZE);
		if (n && xsk_ring_prod__reserve(&c->tx, n, &idx) == n) {
			for (i = 0; i < n; i++) {
				struct xdp_desc *d = xsk_ring_prod__tx_desc(&c->tx, idx + i);

				d->addr = (uint64_t)((idx + i) & (TX_SIZE - 1)) * FRAME_SIZE;
				d->len = len;
				d->options = 0;
			}
			xsk_ring_prod__submit(&c->tx, n);
		}
		if (sendto(xsk_socket__fd(c->xsk), NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EAGAIN &&
		    errno != EBUSY && errno != ENOBUFS && errno != ENETDOWN)
			die("sendto", errno);
		n = xsk_ring_cons__peek(&c->comp, COMP_SIZE, &cidx);
		if (n) {
			xsk_ring_cons__release(&c->comp, n);
			sent += n;
		}
	}
	*packets = sent;
	return now() - start;
}

int main(int argc, char **argv)
{
	struct ctx c = {0};
	unsigned long packets = 0;
	double seconds, took;

	if (argc < 6 || (strcmp(argv[1], "rx") && strcmp(argv[1], "tx")) || (!strcmp(argv[1], "tx") && argc < 7)) {
		fprintf(stderr, "usage: xsk_ref rx|tx IFNAME QUEUE XSKMAP_FD SECONDS [FRAME_HEX]\n");
		return 2;
	}
	seconds = atof(argv[5]);
	open_socket(&c, argv[2], (unsigned int)atoi(argv[3]), atoi(argv[4]));
	took = !strcmp(argv[1], "rx") ? rx(&c, seconds, &packets) : tx(&c, argv[6], seconds, &packets);
	printf("{\"mode\": \"%s\", \"packets\": %lu, \"seconds\": %.6f, \"pps\": %.1f}\n", argv[1], packets, took,
	       packets / took);
	xsk_socket__delete(c.xsk);
	xsk_umem__delete(c.umem);
	munmap(c.area, UMEM_SIZE);
	return 0;
}
