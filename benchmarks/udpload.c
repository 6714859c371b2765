/* A load generator for benchmarks/cost.py: keeps WINDOW requests in flight to 127.0.0.1:PORT and
 * counts the replies that come back in the measured window, so that the load itself costs next
 * to nothing beside the server under test.
 *
 *     udpload PORT WARMUP_S SECONDS WINDOW plain REQUEST_HEX
 *     udpload PORT WARMUP_S SECONDS WINDOW interleaved PAD_TO
 *
 * plain sends one request, over and over.  interleaved sends what our client sends in a session
 * with the server's transmit stamps asked for: each request its own seq, and the T2 of the last
 * reply (xr), so that the server hands out the kernel's stamp of that exchange; padded to PAD_TO.
 * Prints {"replies": N, "seconds": S} on stdout.  Loopback only.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t from_hex(const char *hex, char *out, size_t room) {
    size_t length = strlen(hex) / 2;
    if (length > room) exit(2);
    for (size_t i = 0; i < length; i++) sscanf(hex + 2 * i, "%2hhx", (unsigned char *)&out[i]);
    return length;
}

static unsigned long long last_t2 = 0, next_seq = 0;

static size_t interleaved(char *out, size_t pad_to) {
    char xr[48] = "";
    if (last_t2) snprintf(xr, sizeof xr, ", \"xr\": %llu", last_t2);
    int length = snprintf(out, 4096, "[%llu, \"The time is 2026-11-25 18:34:10.123456\", {\"seq\": %llu, "
                          "\"sid\": 777, \"xl\": 1%s, \"pad\": \"", 1000000 + next_seq, next_seq, xr);
    next_seq++;
    while ((size_t)length + 3 < pad_to) out[length++] = ' ';
    memcpy(out + length, "\"}]", 3);
    return length + 3;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: udpload PORT WARMUP SECONDS WINDOW plain HEX | interleaved PAD_TO\n");
        return 2;
    }
    int port = atoi(argv[1]), window = atoi(argv[4]), is_interleaved = !strcmp(argv[5], "interleaved");
    double warmup = atof(argv[2]), seconds = atof(argv[3]);
    char request[65536], reply[65536];
    size_t pad_to = 0, length = 0;
    if (is_interleaved) pad_to = atoi(argv[6]); else length = from_hex(argv[6], request, sizeof request);
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &server.sin_addr);
    if (connect(sock, (struct sockaddr *)&server, sizeof server)) { perror("connect"); return 2; }
    struct timeval wait = {0, 50000};  /* a reply dropped somewhere: refill the window after 50 ms */
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
    double start = now(), measure_from = start + warmup, measure_to = start + warmup + seconds;
    long counted = 0;
    for (int i = 0; i < window; i++) {
        if (is_interleaved) length = interleaved(request, pad_to);
        send(sock, request, length, 0);
    }
    for (;;) {
        ssize_t got = recv(sock, reply, sizeof reply - 1, 0);
        double at = now();
        if (at >= measure_to) break;
        int refill = got < 0 ? window : 1;
        if (got > 0) {
            if (at >= measure_from) counted++;
            reply[got] = 0;
            char *t2 = strstr(reply, "\"t2\": ");
            if (t2) last_t2 = strtoull(t2 + 6, NULL, 10);
        }
        for (int i = 0; i < refill; i++) {
            if (is_interleaved) length = interleaved(request, pad_to);
            send(sock, request, length, 0);
        }
    }
    printf("{\"replies\": %ld, \"seconds\": %g}\n", counted, seconds);
    return 0;
}
