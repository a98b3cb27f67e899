/* An MPI job (README, "MPI without root"; tests/t_mpi.py and t_readme.py
 * run it): checks that an Open MPI job whose ranks mpirun started on
 * several hosts really runs across them, over ipop0.
 *
 *   mpi_check [MB]      (default 10)
 *
 * 1. every rank reports its host: hostname and the address of ipop0
 *    ("rank R of N: host H ipop0 A"), gathered and printed by rank 0;
 * 2. MPI_Allreduce of known values: the sum of rank+1 (N(N+1)/2), the sum
 *    of squares, and the maximum; every rank checks the results;
 * 3. a round trip of MB megabytes between rank 0 and the last rank: rank 0
 *    fills a buffer (xorshift), sends it with its 64-bit FNV-1a checksum;
 *    the last rank checks the checksum of what arrived and sends the buffer
 *    back; rank 0 checks the returned checksum and bytes.  Rank 0 prints
 *    the rate (both directions' bytes over the round trip's time) and the
 *    job's time from MPI_Init's return to the end of the checks.
 *
 * Rank 0 prints "mpi_check: OK" or "mpi_check: FAILED ..." last; every rank
 * exits 0 only when every check on every rank passed (an MPI_Allreduce of
 * the ranks' verdicts), so mpirun's exit status says the same. */
#include <mpi.h>
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HOSTLEN 192

static uint64_t fnv1a(const unsigned char *p, size_t n)
{
	uint64_t h = 14695981039346656037ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 1099511628211ULL;
	}
	return h;
}

static void vip_of(const char *ifname, char *out, size_t len)
{
	struct ifaddrs *ifa, *i;
	snprintf(out, len, "none");
	if (getifaddrs(&ifa) != 0)
		return;
	for (i = ifa; i; i = i->ifa_next)
		if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET && !strcmp(i->ifa_name, ifname))
			inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, out, len);
	freeifaddrs(ifa);
}

int main(int argc, char **argv)
{
	int rank, size, ok = 1, all_ok = 0;
	char me[HOSTLEN], host[64], vip[64];
	MPI_Init(&argc, &argv);
	double t_start = MPI_Wtime();
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 10;
	size_t n = mb << 20;
	const int last = size - 1;

	/* 1. who runs where */
	gethostname(host, sizeof host);
	host[sizeof host - 1] = 0;
	vip_of("ipop0", vip, sizeof vip);
	snprintf(me, sizeof me, "rank %d of %d: host %s ipop0 %s", rank, size, host, vip);
	char *all = rank == 0 ? malloc((size_t)size * HOSTLEN) : NULL;
	MPI_Gather(me, HOSTLEN, MPI_CHAR, all, HOSTLEN, MPI_CHAR, 0, MPI_COMM_WORLD);
	if (rank == 0) {
		for (int r = 0; r < size; r++)
			printf("%s\n", all + (size_t)r * HOSTLEN);
		free(all);
	}

	/* 2. collective arithmetic with known answers */
	long v[2] = { rank + 1, (long)(rank + 1) * (rank + 1) }, sum[2] = { 0, 0 }, mx = 0, r1 = rank + 1;
	MPI_Allreduce(v, sum, 2, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
	MPI_Allreduce(&r1, &mx, 1, MPI_LONG, MPI_MAX, MPI_COMM_WORLD);
	long want_sum = (long)size * (size + 1) / 2, want_sq = (long)size * (size + 1) * (2 * size + 1) / 6;
	if (sum[0] != want_sum || sum[1] != want_sq || mx != size) {
		ok = 0;
		printf("rank %d: allreduce sum %ld (want %ld), squares %ld (want %ld), max %ld (want %d)\n",
		       rank, sum[0], want_sum, sum[1], want_sq, mx, size);
	}
	if (rank == 0)
		printf("allreduce: sum %ld, squares %ld, max %ld (want %ld, %ld, %d)\n", sum[0], sum[1], mx,
		       want_sum, want_sq, size);

	/* 3. MB megabytes from rank 0 to the last rank and back */
	if (size > 1 && (rank == 0 || rank == last)) {
		unsigned char *buf = malloc(n), *orig = rank == 0 ? malloc(n) : NULL;
		uint64_t h = 0, got;
		if (!buf || (rank == 0 && !orig)) {
			printf("rank %d: out of memory for %zu MB\n", rank, mb);
			MPI_Abort(MPI_COMM_WORLD, 2);
		}
		if (rank == 0) {
			uint64_t x = 88172645463325252ULL;
			for (size_t k = 0; k < n; k++) {
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				orig[k] = (unsigned char)x;
			}
			memcpy(buf, orig, n);
			h = fnv1a(orig, n);
			double t = MPI_Wtime();
			MPI_Send(&h, 1, MPI_UINT64_T, last, 1, MPI_COMM_WORLD);
			MPI_Send(buf, (int)n, MPI_BYTE, last, 2, MPI_COMM_WORLD);
			memset(buf, 0, n);
			MPI_Recv(buf, (int)n, MPI_BYTE, last, 3, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			double el = MPI_Wtime() - t;
			got = fnv1a(buf, n);
			int same = memcmp(buf, orig, n) == 0;
			if (got != h || !same)
				ok = 0;
			printf("transfer: %zu MB rank 0 -> rank %d -> rank 0 in %.3f s: %.1f MB/s; "
			       "checksum %016llx, returned %016llx (%s)\n", mb, last, el, 2.0 * mb / el,
			       (unsigned long long)h, (unsigned long long)got,
			       got == h && same ? "match" : "MISMATCH");
			free(orig);
		} else {
			MPI_Recv(&h, 1, MPI_UINT64_T, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			MPI_Recv(buf, (int)n, MPI_BYTE, 0, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
			got = fnv1a(buf, n);
			if (got != h) {
				ok = 0;
				printf("rank %d: received %zu MB with checksum %016llx, sender's %016llx\n", rank, mb,
				       (unsigned long long)got, (unsigned long long)h);
			}
			MPI_Send(buf, (int)n, MPI_BYTE, 0, 3, MPI_COMM_WORLD);
		}
		free(buf);
	}

	/* every rank's verdict */
	MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
	if (rank == 0) {
		printf("job: %.3f s from MPI_Init to the end of the checks\n", MPI_Wtime() - t_start);
		printf(all_ok ? "mpi_check: OK\n" : "mpi_check: FAILED (a rank's check failed; see above)\n");
	}
	fflush(stdout);
	MPI_Finalize();
	return all_ok ? 0 : 1;
}
