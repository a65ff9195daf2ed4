/* A hostile process tree for the kill-by-uid tests and benchmark: double-forks away from its
 * parent, starts a new session, ignores SIGTERM and SIGHUP, and forks in a loop until RLIMIT_NPROC
 * (argv[1], default 300) stops it, then keeps retrying. Built without sanitizers so its processes
 * are as light as a real attacker's. */
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

int main(int argc, char** argv) {
  rlim_t cap = argc > 1 ? (rlim_t)strtoul(argv[1], NULL, 10) : 300;
  struct rlimit lim = {cap, cap};
  setrlimit(RLIMIT_NPROC, &lim);
  if (fork() != 0) _exit(0);
  setsid();
  if (fork() != 0) _exit(0);
  signal(SIGTERM, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  for (;;) {
    if (fork() < 0) usleep(1000);
  }
}
