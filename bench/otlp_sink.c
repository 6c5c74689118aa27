/* A minimal OTLP/HTTP receiver for the tracing-cost benchmarks (bench/rpc, bench/gateway): reads
   each export, answers 200, decodes nothing. It shares the two cores with the server under test
   and stands in for a collector that would run elsewhere, so it is as lean as a receiver gets:
   one thread per connection, blocking reads into one buffer, the head parsed in place. The
   benchmarks build it with the toolchain's clang (`clang -O2 -pthread`). Prints its port. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFFER (4 << 20)
static const char OK[] = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
static const char BAD[] = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

static void *serve(void *arg) {
    int fd = (int)(long)arg;
    char *buffer = malloc(BUFFER);
    size_t have = 0;
    for (;;) {
        char *end;
        while (!(end = memmem(buffer, have, "\r\n\r\n", 4))) {
            if (have > 65536) goto bad;
            ssize_t got = recv(fd, buffer + have, BUFFER - have, 0);
            if (got <= 0) goto done;
            have += (size_t)got;
        }
        size_t head = (size_t)(end - buffer), length = 0;
        for (char *line = buffer; line < end; ) {
            char *next = memmem(line, (size_t)(end - line), "\r\n", 2);
            if (!next) next = end;
            if ((size_t)(next - line) > 15 && strncasecmp(line, "content-length:", 15) == 0) length = strtoul(line + 15, NULL, 10);
            line = next + 2;
        }
        size_t total = head + 4 + length;
        if (total > BUFFER) goto bad;
        while (have < total) {
            ssize_t got = recv(fd, buffer + have, BUFFER - have, 0);
            if (got <= 0) goto done;
            have += (size_t)got;
        }
        if (send(fd, OK, sizeof OK - 1, MSG_NOSIGNAL) < 0) goto done;
        memmove(buffer, buffer + total, have - total);
        have -= total;
    }
bad:
    send(fd, BAD, sizeof BAD - 1, MSG_NOSIGNAL);
done:
    free(buffer);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(argc > 1 ? atoi(argv[1]) : 0)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t size = sizeof address;
    if (bind(listener, (struct sockaddr *)&address, size) || listen(listener, 16) || getsockname(listener, (struct sockaddr *)&address, &size)) {
        perror("otlp_sink");
        return 1;
    }
    printf("%d\n", ntohs(address.sin_port));
    fflush(stdout);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) continue;
        pthread_t thread;
        pthread_create(&thread, NULL, serve, (void *)(long)fd);
        pthread_detach(thread);
    }
}
