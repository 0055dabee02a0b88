/* A noise floor for the lock-hold figures of bench_full.py: windows of
 * random reads and writes in a shared mapping (what a reclaim step does, with
 * no shmcache code), timed in thread CPU time; prints how many took over 60
 * and 100 us. See benchmarks/results/full_cache_spread.md.
 * Build: gcc -O2 -o /tmp/nf benchmarks/noise_floor.c */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <stdint.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <unistd.h>
#include <string.h>
static uint64_t ns(clockid_t c){struct timespec t;clock_gettime(c,&t);return t.tv_sec*1000000000ull+t.tv_nsec;}
int main(){ size_t S=64<<20; int fd=shm_open("/noise-floor",O_RDWR|O_CREAT|O_EXCL,0600); ftruncate(fd,S); shm_unlink("/noise-floor"); /* gone at exit */
 char *b=mmap(0,S,PROT_READ|PROT_WRITE,MAP_SHARED,fd,0); for(size_t i=0;i<S;i+=4096)b[i]=1;
 uint64_t r=88172645463325252ull; int over60=0,over100=0; uint64_t mx=0; long N=1500000; uint64_t sum=0;
 for(long i=0;i<N;i++){ uint64_t a=ns(CLOCK_THREAD_CPUTIME_ID);
   for(int j=0;j<48;j++){ r^=r<<13;r^=r>>7;r^=r<<17; size_t o=r%(S-512); sum+=b[o]; b[o+64]=(char)sum; }
   memcpy(b+(r%(S-8192)), b+((r>>20)%(S-8192)), 330);
   uint64_t d=ns(CLOCK_THREAD_CPUTIME_ID)-a; if(d>mx)mx=d; if(d>60000)over60++; if(d>100000)over100++; }
 printf("N=%ld random-access windows: >60us %d, >100us %d, max %.1f us (%lu)\n",N,over60,over100,mx/1e3,sum&1);}
