/* A stand-in for a Xen device model (there is no hypervisor on a test machine for QEMU's Xen
 * machine to start on): started by the launcher in QEMU's place, in QEMU's jail and under the
 * domain uid. It opens every node in /dev/xen as QEMU would, reports on stdout (the broker's
 * log of it) one line per node, "open NAME" or "refused NAME ERRNO", forks a child, so a kill
 * must reach more than one process of the uid, says "ready", and both pause until killed.
 * Built without sanitizers: the jail has no /proc for a sanitizer runtime to read. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
  DIR* dir = opendir("/dev/xen");
  if (dir == NULL) {
    printf("no /dev/xen %d\n", errno);
  } else {
    struct dirent* e;
    while ((e = readdir(dir)) != NULL) {
      if (e->d_name[0] == '.') continue;
      char path[300];
      snprintf(path, sizeof path, "/dev/xen/%s", e->d_name);
      int fd = open(path, O_RDWR | O_CLOEXEC);
      if (fd >= 0) {
        printf("open %s\n", e->d_name);
      } else {
        printf("refused %s %d\n", e->d_name, errno);
      }
    }
    closedir(dir);
  }
  fflush(stdout);
  /* The child before "ready": once the test reads it, both processes run. */
  pid_t child = fork();
  if (child < 0) printf("fork failed %d\n", errno);
  if (child != 0) {
    printf("ready\n");
    fflush(stdout);
  }
  for (;;) pause();
}
